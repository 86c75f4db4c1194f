"""Speech recognition on wav2vec2-style CTC models (tiny random wav2vec2 / HuBERT ``*ForCTC`` with a
letter vocabulary): the loss and the transcripts are transformers' own, training lowers the loss,
strategies, predict, export, and the errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import cfg_dict, save_tiny_parakeet, save_tiny_w2v_bert, save_tiny_wav2vec2
from test_audio import PITCHES, tone

from fmtune import config
from fmtune.errors import DataError, ModelError

RATE = 16000


def tone_words(root: Path, n: int, seed: int) -> Path:
    """Clips of 1-3 tones with a pause after each; the transcript names each tone by its first
    letter ("l h m"), in lower case (the vocabulary is upper case, as wav2vec2-base-960h's)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        words = rng.choice(list(PITCHES), size=rng.integers(1, 4))
        parts = []
        for w in words:
            parts += [tone(PITCHES[w], rng.uniform(0.25, 0.4), RATE, rng), np.zeros(1600, np.float32)]
        sf.write(root / f"{i:03d}.wav", np.concatenate(parts), RATE)
        rows.append({"file_name": f"{i:03d}.wav", "text": " ".join(w[0] for w in words)})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def ctc_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ctc-models")
    return {"group": save_tiny_wav2vec2(root / "wav2vec2", ctc_letters="lmh"),
            "layer": save_tiny_wav2vec2(root / "hubert", "hubert", "layer", ctc_letters="lmh")}


@pytest.fixture(scope="module")
def tone_speech(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tone-speech")
    return {"train": tone_words(root / "train", 32, 0), "test": tone_words(root / "test", 8, 1)}


def _bundle(model: Path):
    from fmtune.models import build
    from fmtune.tasks.speech import SpeechRecognition

    task = SpeechRecognition()
    cfg = config.from_dict({"model": {"name": str(model)}, "task": {"type": "speech-recognition"}})
    return build.create(cfg.model, task), task, cfg


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_ctc_loss_and_transcripts_are_transformers_own(ctc_models, tone_speech, norm):
    """The loss over a padded batch (frames past each clip set to the blank) equals transformers'
    Wav2Vec2ForCTC loss; the greedy transcripts equal the tokenizer's decoding of transformers'
    logits for each clip alone; lower-case transcripts become the upper-case vocabulary's ids."""
    from fmtune.generation import lm_net
    from fmtune.models.ctc import transcribe

    bundle, task, cfg = _bundle(ctc_models[norm])
    ds, _ = task.dataset(task.read(tone_speech["train"], cfg.data), bundle, cfg.data)
    tok = bundle.tokenizer
    assert ds.ids[0] == tok(ds.references[0].upper())["input_ids"] and tok.word_delimiter_token_id in ds.ids[0]
    model = bundle.model.eval()
    batch = ds.collate(list(range(6)))
    labels = batch.pop("labels")
    with torch.no_grad():
        ours = task.loss(lm_net(bundle)(**batch).logits, labels)
        mask = batch["frame_mask"] if norm == "layer" else None  # group-norm models: one clip at a time below
        if mask is not None:
            theirs = model(input_values=batch["input_values"], attention_mask=mask, labels=labels).loss
            assert float(ours) == pytest.approx(float(theirs), rel=1e-4)
        alone = []
        for i in range(6):
            one = ds.collate([i])
            alone.append(float(model(input_values=one["input_values"], labels=one["labels"]).loss))
        if mask is None:
            assert float(ours) == pytest.approx(np.mean(alone), rel=1e-4)
        expected = [tok.decode(model(input_values=ds.collate([i])["input_values"]).logits[0].argmax(-1).tolist())
                    for i in range(6)]
    got = transcribe(model, tok, ds, list(range(6)), 4, "cpu")
    assert got == [e.strip() for e in expected] and any(got)  # a random model says something


def test_ctc_speech_recognition_end_to_end(ctc_models, tone_speech, tmp_path):
    """Training lowers the CTC loss on unseen clips; the best checkpoint is chosen on WER; the
    run transcribes files, exports a folder AutoModelForCTC loads with the same transcripts, and a
    LoRA run trains the CTC head beside its adapter while the convolutions stay frozen."""
    from safetensors.torch import load_file

    import fmtune

    out = tmp_path / "full"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fmtune.train(cfg_dict(ctc_models["layer"], tone_speech["train"], out=str(out),
                                        task={"type": "speech-recognition"}, strategy={"name": "full"},
                                        data={"test": str(tone_speech["test"])},
                                        train={"epochs": 6, "batch_size": 8, "lr": 3e-3}), quiet=True)
    ev = summary["eval"]
    assert summary["metric"] == "wer" and {"loss", "wer", "cer"} <= set(ev["test"])
    assert ev["test"]["loss"] < 0.8 * ev["baseline"]["loss"]  # unseen clips: the CTC loss fell
    before = load_file(str(ctc_models["layer"] / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    convs = [k for k in before if ".feature_extractor." in f".{k}"]
    assert convs and all(torch.equal(before[k], after[k]) for k in convs)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    run = json.loads((out / "run.json").read_text())
    assert run["generation"]["transcripts_cased"] == "upper" and run["generation"]["blank"] == "[PAD]"

    clips = sorted(str(p) for p in tone_speech["test"].glob("*.wav"))[:3]
    pred = fmtune.load(out)
    texts = [r["transcript"] for r in pred.predict(clips)]
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    exported = fmtune.export(out, merge=True, quiet=True)
    assert exported["same_transcripts"] and (Path(exported["out"]) / "preprocessor_config.json").is_file()

    lora = tmp_path / "lora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmtune.train(cfg_dict(ctc_models["group"], tone_speech["train"], out=str(lora),
                              task={"type": "speech-recognition"}, train={"epochs": 1, "batch_size": 8}), quiet=True)
    saved = load_file(str(lora / "model" / "adapter_model.safetensors"))
    assert any("lora_" in k for k in saved) and any("lm_head" in k for k in saved)
    assert len(fmtune.load(lora).predict(clips)) == 3
    assert fmtune.export(lora, merge=True, quiet=True)["same_transcripts"]  # the adapter and head folded in


def test_ctc_errors_name_the_row_and_the_model(ctc_models, tone_speech, tmp_path):
    import fmtune

    table = tmp_path / "long.csv"
    pd.DataFrame({"audio": [str(tone_speech["train"] / "000.wav")] * 10,
                  "text": ["l " * 40] + ["l"] * 9}).to_csv(table, index=False)
    with pytest.raises(DataError, match=r"long.csv: row 1 \(line 2\): the transcript is \d+ tokens but the clip "
                                        "gives the model"):
        fmtune.train(cfg_dict(ctc_models["layer"], table, out=str(tmp_path / "a"), task={"type": "speech-recognition"},
                              data={"val": str(table)}), quiet=True)
    encoder = save_tiny_wav2vec2(tmp_path / "encoder")  # no CTC head, no vocabulary, no transcripts to build one
    with pytest.raises(ModelError, match="without a CTC head and vocabulary .* no training transcripts"):
        _bundle(encoder)
    with pytest.raises(Exception, match="strategy prompt does not apply to speech recognition"):
        fmtune.train(cfg_dict(ctc_models["layer"], tone_speech["train"], out=str(tmp_path / "c"),
                              task={"type": "speech-recognition"}, strategy={"name": "prompt"}), quiet=True)


def test_a_pretrained_only_encoder_gets_a_vocabulary_from_the_transcripts(tone_speech, tmp_path):
    """wav2vec2's own recipe: an encoder without a CTC head (wav2vec2-base and the like) gets a
    character vocabulary built from the training transcripts (blank <pad>, <unk>, | between words)
    and a fresh head over it; the encoder keeps its pretrained weights; the run saves, transcribes
    and exports as a whole CTC model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCTC, AutoTokenizer

    import fmtune

    encoder = save_tiny_wav2vec2(tmp_path / "encoder", "wavlm", "layer")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fmtune.train(cfg_dict(encoder, tone_speech["train"], out=str(out),
                                        task={"type": "speech-recognition"}, strategy={"name": "full"},
                                        data={"test": str(tone_speech["test"])},
                                        train={"epochs": 4, "batch_size": 8, "lr": 3e-3}), quiet=True)
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == ["<pad>", "<unk>", "|", "h", "l", "m"]
    run = json.loads((out / "run.json").read_text())
    assert run["generation"]["new_head"] and run["generation"]["blank"] == "<pad>"
    assert run["generation"]["transcripts_cased"] == "lower"
    model = AutoModelForCTC.from_pretrained(out / "model")
    assert model.lm_head.out_features == 6 and model.config.pad_token_id == 0
    before = load_file(str(encoder / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    convs = [k for k in before if k.startswith("feature_extractor.")]
    assert convs and all(torch.equal(before[k], after[f"wavlm.{k}"]) for k in convs)  # pretrained, kept frozen
    ev = summary["eval"]
    assert ev["test"]["loss"] < 0.8 * ev["baseline"]["loss"]  # the fresh head learned on unseen clips
    again = fmtune.evaluate(out, tone_speech["test"], baseline=True, quiet=True)  # the fresh head rebuilt, seeded
    assert again["test"] == pytest.approx(ev["test"]) and again["baseline"] == pytest.approx(ev["baseline"])
    clips = sorted(str(p) for p in tone_speech["test"].glob("*.wav"))[:3]
    texts = [r["transcript"] for r in fmtune.load(out).predict(clips)]
    assert all(set(t) <= set("hlm ") for t in texts)
    assert fmtune.export(out, quiet=True)["same_transcripts"]


def _loss_and_transcripts_are_transformers_own(bundle, task, ds) -> list[str]:
    """A CTC model reading filterbank frames (``input_features``, padded, ``frame_mask``): the loss over a padded
    batch of 6 clips equals transformers' with its attention mask; the transcripts, in batches of 4 or 1, are its
    logits' decoding for each clip alone (returned)."""
    from fmtune.generation import lm_net
    from fmtune.models.ctc import transcribe

    model, tok = bundle.model.eval(), bundle.tokenizer
    batch = ds.collate(list(range(6)))
    labels = batch.pop("labels")
    assert set(batch) == {"input_features", "frame_mask"} and batch["frame_mask"].float().mean() < 1  # padded
    with torch.no_grad():
        ours = task.loss(lm_net(bundle)(**batch).logits, labels)
        theirs = model(input_features=batch["input_features"], attention_mask=batch["frame_mask"], labels=labels).loss
        assert float(ours) == pytest.approx(float(theirs), rel=1e-4)
        expected = [tok.decode(model(input_features=ds.collate([i])["input_features"]).logits[0].argmax(-1).tolist())
                    for i in range(6)]
    got = transcribe(model, tok, ds, list(range(6)), 4, "cpu")
    assert got == [e.strip() for e in expected] == transcribe(model, tok, ds, list(range(6)), 1, "cpu")
    return got


def _trained_and_exported(model_dir: Path, tone_speech: dict, out: Path, strategy: str, epochs: int) -> tuple:
    """``model_dir`` fine-tuned with ``strategy`` (the best checkpoint chosen on the loss: a random model's WER is
    noise), which lowers the loss on unseen clips; exported merged with the same transcripts, as an
    AutoModelForCTC folder whose log-probabilities from its own feature extractor are the run's from fmtune's.
    Returns (exported model, its feature extractor)."""
    from transformers import AutoFeatureExtractor, AutoModelForCTC

    import fmtune
    from fmtune.data.audio import load_audio
    from fmtune.models.ctc import CTCLogits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fmtune.train(cfg_dict(model_dir, tone_speech["train"], out=str(out),
                                        task={"type": "speech-recognition"}, strategy={"name": strategy},
                                        data={"test": str(tone_speech["test"])},
                                        train={"epochs": epochs, "batch_size": 8, "lr": 3e-3, "metric": "loss"}),
                               quiet=True)
    ev = summary["eval"]
    assert ev["test"]["loss"] < 0.8 * ev["baseline"]["loss"], (strategy, ev)
    exported = fmtune.export(out, merge=True, quiet=True)
    assert exported["same_transcripts"]
    folder = Path(exported["out"])
    hf, extractor = AutoModelForCTC.from_pretrained(folder).eval(), AutoFeatureExtractor.from_pretrained(folder)
    wave = load_audio(tone_speech["test"] / "000.wav", 16000)
    pred = fmtune.load(out)
    clip = pred.task.inputs([wave], pred.bundle)
    with torch.no_grad():
        ours = CTCLogits(pred.bundle.model, pred.bundle.tokenizer)(**clip.waveforms(clip.clips[0])).logits[0]
        theirs = hf(**extractor(wave, sampling_rate=16000, return_tensors="pt")).logits[0].log_softmax(-1)
    torch.testing.assert_close(ours, theirs[: len(ours)], atol=2e-2, rtol=0)
    return hf, extractor


def test_w2v_bert_ctc_is_transformers_own_and_learns_from_a_pretrained_only_encoder(tone_speech, tmp_path):
    """w2v-BERT (the Hugging Face blog's recipe for low-resource speech recognition) was refused. A
    Wav2Vec2BertForCTC folder: the loss over a padded batch of stacked filterbank frames equals transformers' with
    its attention mask, and the transcripts are its logits' decoding. A pretrained-only w2v-BERT encoder (w2v-BERT
    2.0 ships no head) gets a vocabulary from the transcripts; full fine-tuning and LoRA lower the loss on unseen
    clips (the best checkpoint chosen on the loss: a random model's WER is noise); the export is a whole CTC model
    (AutoModelForCTC, and SeamlessM4TFeatureExtractor beside it) with the same transcripts, and the same
    log-probabilities from the extractor's features as the run's from fmtune's."""

    bundle, task, cfg = _bundle(save_tiny_w2v_bert(tmp_path / "ctc", ctc_letters="lmh"))
    assert bundle.audio["frontend"] == "stacked-fbank"
    ds, _ = task.dataset(task.read(tone_speech["train"], cfg.data), bundle, cfg.data)
    _loss_and_transcripts_are_transformers_own(bundle, task, ds)

    encoder = save_tiny_w2v_bert(tmp_path / "encoder")
    for strategy in ("full", "lora"):
        hf, extractor = _trained_and_exported(encoder, tone_speech, tmp_path / strategy, strategy, epochs=4)
        assert hf.lm_head.out_features == 6 and type(extractor).__name__ == "SeamlessM4TFeatureExtractor"


def test_parakeet_ctc_is_transformers_own_and_learns(tone_speech, tmp_path):
    """Parakeet (NVIDIA's FastConformer CTC models: parakeet-ctc-0.6b / 1.1b) was refused ("a model of type
    'parakeet_ctc'"). Its features are ParakeetFeatureExtractor's (NeMo's log-mel, each band normalised over the
    clip); the loss over a padded batch equals transformers' with its attention mask; the transcripts are its
    logits' decoding (its SentencePiece pieces, repeats merged, the blank <pad> dropped) and do not depend on the
    batch; full fine-tuning and LoRA (attention and feed-forward projections, the 1x1-convolution head trained
    beside the adapter) lower the loss on unseen clips; the export is a whole AutoModelForCTC folder with
    ParakeetFeatureExtractor beside it, giving the run's log-probabilities from the extractor's features. Memory is
    estimated from its encoder's config (its own holds none)."""
    from safetensors.torch import load_file
    from transformers import AutoFeatureExtractor

    from fmtune.data.audio import load_audio
    from fmtune.training.memory import shape_of

    model_dir = save_tiny_parakeet(tmp_path / "ctc", ["l m h", "h m l", "m l h"] * 10)
    bundle, task, cfg = _bundle(model_dir)
    assert bundle.audio["extractor"] == "ParakeetFeatureExtractor" and bundle.audio["subsample"] == 8
    assert (shape_of(bundle.model).hidden, shape_of(bundle.model).layers) == (32, 2)  # (its encoder's config)
    ds, _ = task.dataset(task.read(tone_speech["train"], cfg.data), bundle, cfg.data)
    waves = [load_audio(tone_speech["train"] / f"{i:03d}.wav", 16000) for i in range(6)]
    extracted = AutoFeatureExtractor.from_pretrained(model_dir)(waves, sampling_rate=16000, return_tensors="pt")
    for i in range(6):
        n = int(extracted["attention_mask"][i].sum())
        torch.testing.assert_close(ds.clips[i][0].float().T, extracted["input_features"][i, :n], atol=3e-3, rtol=1e-3)
    assert any(_loss_and_transcripts_are_transformers_own(bundle, task, ds))  # (a random model says something)

    for strategy in ("full", "lora"):
        out = tmp_path / strategy
        _, extractor = _trained_and_exported(model_dir, tone_speech, out, strategy, epochs=6)
        assert type(extractor).__name__ == "ParakeetFeatureExtractor"
        if strategy == "lora":
            saved = load_file(str(out / "model" / "adapter_model.safetensors"))
            assert any("lora_" in k for k in saved) and any("ctc_head" in k for k in saved)
            adapted = json.loads((out / "model" / "adapter_config.json").read_text())["target_modules"]
            assert set(adapted) == {"q_proj", "k_proj", "v_proj", "o_proj", "linear1", "linear2"}


def test_a_ctc_clip_longer_than_the_window_has_no_loss_but_is_transcribed(ctc_models, tone_speech):
    """As for Whisper (test_speech): a clip longer than the window keeps its transcript for WER, has no CTC loss,
    and is left out of the training set with a warning."""
    from fmtune.data.audio import AudioSpec
    from fmtune.models.ctc import CTCLogits

    bundle, task, cfg = _bundle(ctc_models["layer"])
    bundle.audio = {**bundle.audio, "window_seconds": AudioSpec(window_seconds=1.0).window_seconds}
    df = task.read(tone_speech["train"], cfg.data).head(12)
    ds, _ = task.dataset(df, bundle, cfg.data)
    long = [i for i, c in enumerate(ds.clips) if len(c) > 1]
    assert long and len(long) < len(ds) and all(ds.ids[i] is None for i in long)
    assert ds.trained_rows() == [i for i in range(len(ds)) if i not in long]
    net = CTCLogits(bundle.model, bundle.tokenizer)
    metrics = task.evaluate_model(net, ds, 4, "cpu", sample=list(range(len(ds))))
    alone = task.evaluate_model(net, ds.only(ds.trained_rows()), 4, "cpu", sample=[])
    assert metrics["loss"] == pytest.approx(alone["loss"], rel=1e-5)  # the loss of the clips within the window
    assert np.isfinite(metrics["wer"]) and len(task.last_answers) == len(ds)  # every clip transcribed
    only_long = task.evaluate_model(net, ds.only(long), 4, "cpu", sample=list(range(len(long))))
    assert np.isnan(only_long["loss"]) and np.isfinite(only_long["wer"])  # no loss to report, not a loss of 0
    with pytest.warns(UserWarning, match=rf"{len(long)} of 12 training clips are longer than the model's 1 s window"):
        train = task.training_set(ds)
    assert len(train) == len(ds) - len(long) and train.ids == [ds.ids[i] for i in ds.trained_rows()]
