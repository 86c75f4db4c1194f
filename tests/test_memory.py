"""Batches within memory (fmtune.training.memory): the activation estimate follows the model's shape
and the examples' lengths; a batch that would not fit trains as micro-batches (as many examples an
optimizer step) and is read in smaller forward passes, with the same predictions."""

import json

import numpy as np
import torch
from conftest import cfg_dict, save_tiny_wav2vec2
from test_audio import save_tones
from test_ctc import tone_words

import fmtune
from fmtune.config import from_dict
from fmtune.training import memory


class _Lengths:
    """A dataset that only tells its lengths."""

    def __init__(self, tokens, longest=None, samples=None):
        self.tokens = np.asarray(tokens)
        self.longest = self.tokens if longest is None else np.asarray(longest)
        self.samples = samples

    def memory_profile(self):
        return self.tokens, self.longest, self.samples


def _bert(**kw):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, **kw))


def test_the_estimate_reads_the_model_shape_and_grows_with_length():
    from transformers import ResNetConfig, ResNetModel, Wav2Vec2Config, Wav2Vec2Model, WhisperConfig, WhisperModel

    bert = memory.shape_of(_bert())
    assert (bert.hidden, bert.layers, bert.ffn, bert.heads, bert.attention_dropout) == (32, 2, 64, 2, 0.1)
    whisper = memory.shape_of(WhisperModel(WhisperConfig(d_model=32, encoder_layers=3, decoder_layers=1,
                                                         encoder_attention_heads=2, decoder_attention_heads=2,
                                                         encoder_ffn_dim=48, decoder_ffn_dim=16)))
    assert (whisper.hidden, whisper.layers, whisper.ffn, whisper.heads) == (32, 3, 48, 2)  # the encoder's
    w2v = memory.shape_of(Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, conv_dim=(16,) * 7)))
    assert (w2v.stem_channels, w2v.stem_stride) == (16, 5)  # its first convolution reads the waveform
    assert memory.shape_of(ResNetModel(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1]))) is None  # not known
    # per example: linear in the tokens, plus the attention probabilities where dropout keeps them
    one, two = bert.example_bytes(100, 100), bert.example_bytes(200, 200)
    no_dropout = memory.Shape(32, 2, 64, 2)
    assert two > 2 * one and no_dropout.example_bytes(200, 200) == 2 * no_dropout.example_bytes(100, 100)
    # an audio clip of two windows attends within each: less than one sequence twice as long
    assert bert.example_bytes(200, 100) < two
    assert bert.example_bytes(100, 100, train=False) < one
    assert w2v.example_bytes(50, 50, samples=16000) > w2v.example_bytes(50, 50)
    # the measured reference points of the module doc, within the error it states (real shapes, no weights)
    mib = 2**20  # measured peak per example (MiB): MiniLM-L6 at 512 tokens 350, Whisper-small's encoder at 30 s 1,371
    assert 0.88 * 350 < memory.Shape(384, 6, 1536, 12, 0.1).example_bytes(512, 512) / mib < 1.45 * 350
    assert 0.88 * 1371 < memory.Shape(768, 12, 3072, 12).example_bytes(1500, 1500) / mib < 1.45 * 1371


def test_a_vision_transformer_reads_an_image_as_patches():
    from transformers import ViTConfig, ViTModel

    from fmtune.data.dataset import ImageData

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=64, patch_size=16))
    shape = memory.shape_of(vit)
    assert shape.patch == 16
    images = ImageData(torch.zeros((4, 3, 64, 64), dtype=torch.uint8), None, {"size": 64, "mean": [0.5] * 3,
                                                                           "std": [0.5] * 3})
    assert images.image_side == 64
    one = shape.example_bytes(17, 17)  # (64 / 16)^2 patches and the class token
    cfg = from_dict({"train": {"batch_size": 8}})
    assert memory.fit_training(cfg, vit, images, budget=int(2.5 * one))[0].train.batch_size == 2
    bigger = ImageData(images.images, None, {**images.spec, "size": 128})  # 65 positions: a quarter fits
    assert memory.fit_training(cfg, vit, bigger, budget=int(2.5 * one))[0].train.batch_size == 1


def test_a_batch_over_the_budget_becomes_micro_batches_of_a_divisor():
    model = _bert()
    cfg = from_dict({"train": {"batch_size": 16, "grad_accum": 2}})
    ds = _Lengths([10, 40, 20])
    worst = memory.shape_of(model).example_bytes(40, 40)
    same, note = memory.fit_training(cfg, model, ds, budget=int(16 * worst))
    assert note is None and same.train.batch_size == 16
    cut, note = memory.fit_training(cfg, model, ds, budget=int(5.5 * worst))  # 5 fit: 4 divides 16
    assert (cut.train.batch_size, cut.train.grad_accum) == (4, 8)  # 32 examples an optimizer step, as before
    assert note["micro_batch"] == 4 and "micro-batches of 4" in note["why"] and "32 examples" in note["why"]
    lora = from_dict({"train": {"batch_size": 16, "grad_accum": 2}, "strategy": {"name": "lora"}})
    assert memory.fit_training(lora, model, ds, budget=int(5.5 * worst))[0].train.batch_size == 4
    assert memory.fit_training(lora, model, ds, budget=int(4.5 * worst))[0].train.batch_size == 2  # adapters: more
    one, _ = memory.fit_training(cfg, model, ds, budget=1)
    assert (one.train.batch_size, one.train.grad_accum) == (1, 32)
    assert memory.fit_training(cfg, model, object(), budget=1)[1] is None  # nothing known of the lengths
    assert memory.inference_batch(model, ds, 128, budget=int(10.5 * memory.shape_of(model).example_bytes(
        40, 40, train=False))) == 10
    assert memory.inference_batch(model, ds, 128, budget=1 << 40) == 128


def test_text_training_splits_a_batch_that_does_not_fit(tmp_path, tiny_bert, text_files, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)  # nothing free: one example a pass
    out = tmp_path / "run"
    summary = fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(out), train={"epochs": 1}))
    assert summary["best"] is not None
    saved = fmtune.config.load(out / "config.yaml").train
    assert (saved.batch_size, saved.grad_accum) == (1, 16)
    info = json.loads((out / "run.json").read_text())
    assert info["micro_batches"]["batch_size"] == 16 and info["micro_batches"]["micro_batch"] == 1
    assert info["fit"]["steps"] == 14  # 216 training rows: 14 optimizer steps of 16, as unsplit
    assert "memory: a batch of 16" in capsys.readouterr().err


def test_prediction_in_smaller_passes_is_the_same(text_run, monkeypatch):
    texts = [f"text number {i} " * (1 + i % 5) for i in range(20)]
    before = fmtune.load(text_run).predict(texts)
    passes = []
    real = memory.inference_batch

    def spy(*a, **kw):
        passes.append(real(*a, **kw))
        return passes[-1]

    monkeypatch.setattr(memory, "inference_batch", spy)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    after = fmtune.load(text_run).predict(texts)
    assert passes and set(passes) == {1}
    np.testing.assert_allclose([r["score"] for r in after], [r["score"] for r in before], atol=1e-5)
    assert [r["label"] for r in after] == [r["label"] for r in before]


def test_audio_lengths_count_encoder_positions(tmp_path):
    from fmtune.data.audio import FBANK, LOG_MEL, STACKED, WAVEFORM, AudioData, AudioSpec, clips_profile

    assert AudioSpec(frontend=LOG_MEL).positions(3000) == 1500  # Whisper's 30 s
    assert AudioSpec(frontend=WAVEFORM).positions(16000 * 30) == 1500
    assert AudioSpec(frontend=STACKED).positions(1500) == 1500
    assert AudioSpec(frontend=FBANK, n_mels=128, frames=1024).positions(10) == 12 * 101 + 2  # AST's patches
    spec = AudioSpec(frontend=WAVEFORM, window_seconds=1.0)
    clips = [[torch.zeros(16000), torch.zeros(8000)], [torch.zeros(3200)]]
    tokens, longest, samples = AudioData(clips, None, spec).memory_profile()
    assert tokens.tolist() == [75, 10] and longest.tolist() == [50, 10] and samples.tolist() == [24000, 3200]
    per_window = clips_profile(clips, spec, per_window=True)
    assert per_window[0].tolist() == [50, 25, 10]
    # a Whisper window reads its bucket in training, the whole 30 s where the model was not trained in buckets
    from fmtune.tasks.speech import BUCKET_SECONDS, SpeechData

    whisper = SpeechData([[torch.zeros(80, 500)]], None, 0, 0, AudioSpec(), [None], [1], ["a.wav"])
    frames = int(100 * BUCKET_SECONDS)  # a bucket's log-mel frames (100 a second)
    bucket = -(-(500 + 2) // frames) * frames // 2  # 500 frames and 2 of padding, to the next bucket; halved
    assert whisper.memory_profile()[0].tolist() == [bucket] and bucket < 1500
    assert whisper.memory_profile(lambda w: whisper.width(w, full_window=True))[0].tolist() == [1500]


def test_audio_training_on_a_waveform_encoder_within_memory(tmp_path, monkeypatch):
    """A wav2vec2-style model on clips: the budget cuts the batch; training, evaluation and the test run."""
    model = save_tiny_wav2vec2(tmp_path / "w2v")
    train = save_tones(tmp_path / "train", 6, 0)
    test = save_tones(tmp_path / "test", 2, 1)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    out = tmp_path / "run"
    summary = fmtune.train(cfg_dict(model, train, out=str(out), task={"type": "audio-classification"},
                                    data={"test": str(test)}, train={"epochs": 1, "batch_size": 4}), quiet=True)
    assert "accuracy" in summary["eval"]["test"]
    info = json.loads((out / "run.json").read_text())
    assert info["micro_batches"]["micro_batch"] == 1 and info["micro_batches"]["grad_accum"] == 4
    assert info["micro_batches"]["estimate_mib_per_example"] > 0



def test_speech_recognition_and_a_cached_head_within_memory(tmp_path, monkeypatch):
    """Speech recognition trains in micro-batches too (a CTC model, LoRA); a head on the frozen encoder's
    features is left alone (nothing is kept for a backward pass through the encoder)."""
    model = save_tiny_wav2vec2(tmp_path / "w2v-ctc", ctc_letters="lmh")
    speech = tone_words(tmp_path / "speech", 16, 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    out = tmp_path / "asr"
    fmtune.train(cfg_dict(model, speech, out=str(out), task={"type": "speech-recognition"},
                          train={"epochs": 1, "batch_size": 4}), quiet=True)
    info = json.loads((out / "run.json").read_text())
    assert (info["micro_batches"]["micro_batch"], info["micro_batches"]["grad_accum"]) == (1, 4)
    assert fmtune.config.load(out / "config.yaml").train.batch_size == 1
    tones = save_tones(tmp_path / "tones", 4, 0)
    fmtune.train(cfg_dict(save_tiny_wav2vec2(tmp_path / "w2v"), tones, out=str(tmp_path / "head"),
                          task={"type": "audio-classification"}, strategy={"name": "head"},
                          train={"epochs": 1, "batch_size": 4}), quiet=True)
    assert "micro_batches" not in json.loads((tmp_path / "head" / "run.json").read_text())


def test_the_feature_cache_is_filled_in_smaller_passes_with_the_same_numbers(tmp_path, tiny_st_bert, monkeypatch):
    from conftest import small_bundle

    from fmtune.config import StrategyConfig
    from fmtune.data.dataset import TextData
    from fmtune.strategies import apply_strategy
    from fmtune.tasks import Classification
    from fmtune.training import cache

    bundle = small_bundle(tiny_st_bert, Classification(["a", "b"]))
    apply_strategy(bundle, StrategyConfig(name="head"))
    split, _ = cache.plan(bundle)
    ds = TextData([[2, 5, 6, 3], [2, 7, 3], [2, 9, 9, 9, 8, 3]], torch.tensor([0, 1, 0]), 0)
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "whole"))
    whole = np.array(cache.build(bundle, split, ds, 8)[0].data)
    passes = []
    real = memory.inference_batch
    monkeypatch.setattr(memory, "inference_batch", lambda *a, **kw: passes.append(real(*a, **kw)) or passes[-1])
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "one-by-one"))
    single = np.array(cache.build(bundle, split, ds, 8)[0].data)
    assert passes == [1]
    np.testing.assert_allclose(single, whole, atol=1e-5)
