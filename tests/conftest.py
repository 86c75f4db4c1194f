"""Shared fixtures: tiny random-init models saved as Hugging Face folders, and small data files
whose labels a tiny model can learn (a keyword decides the label)."""

from __future__ import annotations

import contextlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fmtune.config import SOLVED_HEAD  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "plot", "actor", "was", "a", "film",
         "story", "very", "really", "scene", "music"]
POS, NEG = ["good", "great", "fine"], ["bad", "awful", "poor"]
FILLER = ["the", "movie", "plot", "actor", "was", "a", "film", "story", "very", "really", "scene", "music"]

# one thread per pytest-xdist worker (make test runs two on 2 cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def make_text_rows(n: int, seed: int = 0, task: str = "classification") -> pd.DataFrame:
    """Texts of filler words with one sentiment word that decides the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        positive = bool(rng.integers(2))
        key = rng.choice(POS if positive else NEG)
        words = list(rng.choice(FILLER, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(len(words) + 1)), key)
        text = " ".join(words)
        if task == "classification":
            label = "pos" if positive else "neg"
        elif task == "multilabel":
            extra = "|music" if "music" in words else ""
            label = ("pos" if positive else "neg") + extra
        else:
            label = f"{(3.0 if positive else -1.0) + rng.normal(0, 0.1):.4f}"
        rows.append({"text": text, "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT, hidden size 32, with a word-level vocabulary, saved as a HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_st_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT marked as a sentence-transformers encoder (mean pooling)."""
    import shutil

    d = tmp_path_factory.mktemp("tiny-st-bert") / "m"
    shutil.copytree(tiny_bert, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    torch.manual_seed(0)
    ViTModel(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return d


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    """A tiny ResNet (BatchNorm inside) as a HF folder."""
    from transformers import ResNetConfig, ResNetModel

    d = tmp_path_factory.mktemp("tiny-resnet")
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", image_size=32)
    torch.manual_seed(0)
    ResNetModel(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 32}}))
    return d


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text-data")
    out = {}
    for name, n, seed in (("train", 240, 0), ("val", 60, 1), ("test", 80, 2)):
        out[name] = d / f"{name}.csv"
        make_text_rows(n, seed).to_csv(out[name], index=False)
    for task in ("multilabel", "regression"):
        for name, n, seed in (("train", 240, 0), ("test", 60, 2)):
            out[f"{task}_{name}"] = d / f"{task}_{name}.csv"
            make_text_rows(n, seed, task).to_csv(out[f"{task}_{name}"], index=False)
    return out


def save_shape_images(root: Path, n_per_class: int, seed: int = 0, size: int = 32) -> Path:
    """Two classes a tiny model can tell apart: bright top half vs bright bottom half."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in ("top", "bottom"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            half = slice(0, size // 2) if label == "top" else slice(size // 2, size)
            img[half] += 150
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("image-data")
    return {"train": save_shape_images(d / "train", 30, 0), "test": save_shape_images(d / "test", 10, 1)}


def save_tiny_whisper(folder: Path, vocab_size: int = 64, max_target_positions: int = 64) -> Path:
    """A 2+2-layer random Whisper (d_model 32) and Whisper's feature extractor settings, saved as a
    transformers folder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=max_target_positions,
                        decoder_start_token_id=1, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
         "hop_length": 160, "n_fft": 400, "chunk_length": 30}))
    return folder


def save_tiny_moonshine(folder: Path, texts: list[str]) -> Path:
    """A 2+2-layer random Moonshine (hidden 32: its convolutions over the 16 kHz waveform, rotary encoder and
    decoder), a SentencePiece-like BPE tokenizer of ``texts`` (<unk>, <s> the decoder start, </s> the end, as
    Moonshine's) and its feature extractor's settings (the waveform as it is), saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MoonshineConfig, MoonshineForConditionalGeneration, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    cfg = MoonshineConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2,
                          decoder_num_hidden_layers=2, encoder_num_attention_heads=2, decoder_num_attention_heads=2,
                          encoder_num_key_value_heads=2, decoder_num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, decoder_start_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    MoonshineForConditionalGeneration(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
         "padding_value": 0.0, "do_normalize": False, "return_attention_mask": True}))
    return folder


def save_tiny_speech2text(folder: Path, texts: list[str], cmvn: bool = True) -> Path:
    """A 2+2-layer random Speech2Text (d_model 32: two strided convolutions over 80 filterbank bands, sinusoidal
    positions), a SentencePiece unigram tokenizer of ``texts`` with its vocabulary (<s>, <pad>, </s> the decoder
    start and end, <unk>, as Speech2Text's) and Speech2TextFeatureExtractor's settings (``cmvn``: each band
    normalised over the clip, as every released Speech2Text model's; without it a tone's band keeps its level, which
    a random model learns in seconds), saved as a transformers folder."""
    import io

    import sentencepiece as spm
    from transformers import (
        Speech2TextConfig,
        Speech2TextFeatureExtractor,
        Speech2TextForConditionalGeneration,
        Speech2TextTokenizer,
    )

    folder.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, vocab_size=20,
                                   model_type="unigram", bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
                                   minloglevel=2)
    (folder / "sentencepiece.bpe.model").write_bytes(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]  # (0: <unk>)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *pieces])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    Speech2TextTokenizer(str(folder / "vocab.json"), str(folder / "sentencepiece.bpe.model")).save_pretrained(folder)
    cfg = Speech2TextConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, conv_channels=16, max_source_positions=1500, max_target_positions=64)
    torch.manual_seed(0)
    Speech2TextForConditionalGeneration(cfg).save_pretrained(folder)
    Speech2TextFeatureExtractor(do_ceptral_normalize=cmvn).save_pretrained(folder)
    return folder


def save_tiny_parakeet(folder: Path, texts: list[str]) -> Path:
    """A 2-layer random Parakeet CTC model (FastConformer, hidden 32: 8x convolutional subsampling of 80 mel bands,
    relative-position attention, convolution modules), a SentencePiece-like BPE vocabulary of ``texts`` (<unk> first,
    the blank <pad> last, as Parakeet's) and ParakeetFeatureExtractor's settings, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import ParakeetCTCConfig, ParakeetFeatureExtractor, ParakeetForCTC, ParakeetTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    bpe.add_special_tokens(["<pad>"])
    tok = ParakeetTokenizer(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>")
    tok.save_pretrained(folder)
    cfg = ParakeetCTCConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, encoder_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        subsampling_conv_channels=8, conv_kernel_size=9, num_mel_bins=80, layerdrop=0.0))
    torch.manual_seed(0)
    ParakeetForCTC(cfg).save_pretrained(folder)
    ParakeetFeatureExtractor().save_pretrained(folder)
    return folder


def save_tiny_wav2vec2(folder: Path, model_type: str = "wav2vec2", feat_extract_norm: str = "group",
                       ctc_letters: str | None = None) -> Path:
    """A 2-layer random raw-waveform encoder (hidden 32; wav2vec2's 7-convolution feature encoder at
    16 channels, 20 ms a frame) and Wav2Vec2FeatureExtractor's settings, saved as a transformers folder;
    with ``ctc_letters``, a ``*ForCTC`` model and a character vocabulary of those letters (upper case,
    as wav2vec2-base-960h's), [PAD] the blank and | between words."""
    from transformers import AutoConfig, AutoModel, AutoModelForCTC, Wav2Vec2CTCTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "|", *sorted(set((ctc_letters or "").upper()))])}
    sew: dict = {"conv_dim": (16,) * (13 if model_type.startswith("sew") else 7)}  # (SEW: 13 convolutions)
    if model_type == "sew-d":
        sew.update(position_buckets=16, max_position_embeddings=64)
    cfg = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, **sew, num_conv_pos_embeddings=16,
                               num_conv_pos_embedding_groups=2, feat_extract_norm=feat_extract_norm,
                               do_stable_layer_norm=feat_extract_norm == "layer", vocab_size=len(vocab), pad_token_id=0,
                               ctc_loss_reduction="mean")
    torch.manual_seed(0)
    if ctc_letters:
        AutoModelForCTC.from_config(cfg).save_pretrained(folder)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                             word_delimiter_token="|").save_pretrained(folder)
    else:
        AutoModel.from_config(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
         "padding_value": 0.0, "do_normalize": True, "return_attention_mask": feat_extract_norm == "layer"}))
    return folder


def save_tiny_w2v_bert(folder: Path, ctc_letters: str | None = None) -> Path:
    """A 2-layer random w2v-BERT (wav2vec2-bert, hidden 32: conformer layers with relative positions, as
    w2v-BERT 2.0) and SeamlessM4TFeatureExtractor's settings (80 mel bands, two frames stacked), saved as a
    transformers folder; with ``ctc_letters``, a ``Wav2Vec2BertForCTC`` and a character vocabulary of those letters
    (lower case, as the blog recipe's), <pad> the blank and | between words; without, the pretrained encoder
    alone (w2v-BERT 2.0's Wav2Vec2BertModel, no vocabulary)."""
    from transformers import (
        SeamlessM4TFeatureExtractor,
        Wav2Vec2BertConfig,
        Wav2Vec2BertForCTC,
        Wav2Vec2BertModel,
        Wav2Vec2CTCTokenizer,
    )

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "|", *sorted(set(ctc_letters or ""))])}
    cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             output_hidden_size=32, conv_depthwise_kernel_size=7, vocab_size=len(vocab),
                             pad_token_id=0, ctc_loss_reduction="mean")
    torch.manual_seed(0)
    if ctc_letters:
        Wav2Vec2BertForCTC(cfg).save_pretrained(folder)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                             word_delimiter_token="|").save_pretrained(folder)
    else:
        Wav2Vec2BertModel(cfg).save_pretrained(folder)
    SeamlessM4TFeatureExtractor().save_pretrained(folder)
    return folder


def save_tiny_ast(folder: Path, max_length: int = 100) -> Path:
    """A 2-layer random Audio Spectrogram Transformer (hidden 32) reading ``max_length`` filterbank frames
    (1 s) of 128 mel bins, and ASTFeatureExtractor's settings, saved as a transformers folder."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_length=max_length, num_mel_bins=128)
    torch.manual_seed(0)
    ASTModel(cfg).save_pretrained(folder)
    ASTFeatureExtractor(max_length=max_length).save_pretrained(folder)
    return folder


def save_turned_photo(path: Path, upright: np.ndarray) -> Path:
    """``upright`` (H, W, 3 uint8) saved as a phone camera saves a photo held upright: the pixels stored a quarter
    turn round (W x H) with EXIF orientation 6, which tells viewers (and annotation tools) to turn them back."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return path


def cfg_dict(model_name: Path | str, train_file: Path, **sections) -> dict:
    """A small, fast config: a few epochs, small batches, every default otherwise. The validation
    split is always made (data.min_val_per_class=0): these small files would otherwise train
    without one (few labels, tested in test_fewshot.py with the default); the batch size stays as
    given (train.min_steps off; tested in test_train.py). A head trained by gradient starts random
    (train.head_init random: the probe it would start from costs a fit per run; tested in
    test_head_probe.py), unless the test sets head_init. Full fine-tuning trains the token embeddings
    too (strategy.freeze_embeddings false): the tiny encoders' weights are random, there is nothing
    pretrained to keep, and the keyword data is learnt there (the default is tested in
    test_strategies.py)."""
    base = {
        "model": {"name": str(model_name), "max_length": 32},
        "data": {"train": str(train_file), "min_val_per_class": 0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "eval_batch_size": 64, "patience": None,
                  "num_threads": 1, "precision": "fp32", "min_steps": None},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    strategy = base.get("strategy", {})
    if isinstance(strategy, dict):
        base["strategy"] = {"freeze_embeddings": False, **strategy}
    if (strategy.get("name", "full") if isinstance(strategy, dict) else strategy) not in (*SOLVED_HEAD, "auto"):
        base["train"].setdefault("head_init", "random")
    return base


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own feature cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "feature-cache"))


# --- one optimizer step on a freshly built model: what each strategy changes -------------------

def assert_head_cache_trains_the_same(make_cfg, tmp_path: Path, capsys, monkeypatch, says: str) -> None:
    """Train strategy head twice from ``make_cfg(out, feature_cache=...)``, with the feature cache
    (auto) and without (off): the same weights (2e-3), validation best and test metrics; the plan
    line says ``says``; two cache folders (train and val)."""
    from safetensors.torch import load_file

    from fmtune import api

    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    runs = {}
    for mode in ("auto", "off"):
        cfg = make_cfg(tmp_path / mode, feature_cache=mode)
        cfg["strategy"] = {"name": "head"}
        runs[mode] = api.train(cfg, quiet=mode == "off", report=False)
    assert says in capsys.readouterr().err
    assert len(list((tmp_path / "cache").iterdir())) == 2
    a = load_file(str(tmp_path / "auto" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "off" / "model" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-3), k
    assert runs["auto"]["eval"]["test"] == pytest.approx(runs["off"]["eval"]["test"], abs=2e-3)
    assert runs["auto"]["best"] == pytest.approx(runs["off"]["best"], abs=2e-3)


def small_bundle(name, task):
    """A model built the way `fmtune train` builds it, small inputs (16 tokens, 32 px)."""
    from fmtune.config import ModelConfig
    from fmtune.models import build

    torch.manual_seed(0)
    return build.create(ModelConfig(name=str(name), max_length=16, image_size=32), task)


def random_batch(bundle, n: int = 4) -> dict:
    if bundle.kind == "text":
        ids = torch.randint(5, 20, (n, 7))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"pixel_values": torch.randn(n, 3, 32, 32)}


def strategy_step(bundle, strategy, task):
    """Apply ``strategy``, take one AdamW step on a random batch. Returns (counts, names changed,
    names with a gradient, buffers before the step); names are the (possibly peft-wrapped) model's."""
    from fmtune.config import TrainConfig
    from fmtune.strategies import apply_strategy, set_train_mode
    from fmtune.training.optim import make_optimizer

    counts = apply_strategy(bundle, strategy)
    model = bundle.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, head_lr=1e-2))
    set_train_mode(model)
    n_out = task.num_outputs
    loss = task.loss(model(**random_batch(bundle)).logits, torch.arange(4) % n_out)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    return counts, changed, with_grad, buffers


@pytest.fixture
def model_path(request):
    """Parametrize indirectly with a fixture name (tiny_*) or a zoo model name."""
    name = request.param
    return request.getfixturevalue(name) if name.startswith("tiny") else name


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, tiny_st_bert, text_files) -> Path:
    """A finished run on the keyword data (tiny encoder, 3 epochs, with a test file): for the
    verbs that use a run (predict, export, serve). Tests may add exports under it."""
    import fmtune

    out = tmp_path_factory.mktemp("text-run") / "run"
    fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(out), data={"test": str(text_files["test"])},
                          train={"epochs": 3}), quiet=True)
    return out


SIZE, SQUARE = 48, 12


def save_square_images(root: Path, n_per_class: int, seed: int) -> tuple[Path, dict]:
    """Grey noise with one coloured square at a random place: its colour (red/blue) is the label.
    Returns the folder and, per file, the square's box."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    boxes = {}
    for label, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(70, 180, size=(SIZE, SIZE, 3), dtype=np.uint8)
            y, x = rng.integers(0, SIZE - SQUARE, size=2)
            img[y: y + SQUARE, x: x + SQUARE] = colour
            path = root / label / f"{i}.png"
            Image.fromarray(img).save(path)
            boxes[str(path)] = (int(y), int(x))
    return root, boxes


@pytest.fixture(scope="session")
def square_run(tmp_path_factory, tiny_resnet):
    """A tiny ResNet trained to tell red squares from blue ones: (run, test folder, square boxes)."""
    import fmtune

    d = tmp_path_factory.mktemp("squares")
    train, _ = save_square_images(d / "train", 40, 0)
    test, boxes = save_square_images(d / "test", 6, 1)
    out = d / "run"
    fmtune.train(cfg_dict(tiny_resnet, train, out=str(out), model={"image_size": SIZE},
                          data={"test": str(test)}, train={"epochs": 6, "lr": 3e-3}), quiet=True)
    return out, test, boxes


def hf_parquet(path: Path, columns: dict[str, list], names: dict[str, list[str]], lists: set[str],
               media: dict[str, str] | None = None) -> Path:
    """A Parquet file as Hugging Face ``datasets`` writes one: class ids, with the names in the
    schema's ``huggingface`` metadata, and images / clips (``media``: column -> Image or Audio)
    embedded as {bytes, path} (the layout ``datasets`` 5.2's ``to_parquet`` writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {}
    for col in columns:
        inner = ({"names": names[col], "_type": "ClassLabel"} if col in names else
                 {"_type": media[col]} if media and col in media else {"dtype": "string", "_type": "Value"})
        features[col] = {"feature": inner, "_type": "List"} if col in lists else inner
    table = pa.table(columns)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def class_folders_as_hf_parquet(dirs: dict[str, Path], out: Path, column: str, kind: str,
                                pattern: str) -> tuple[dict[str, Path], list[str]]:
    """Folders of class sub-folders (one per split) written as Hugging Face Parquet splits: each
    file embedded in ``column`` as {bytes, path} (``kind``: Image or Audio), the class as an id.
    Returns the files and the class names (sorted, id order)."""
    names = sorted({p.parent.name for p in next(iter(dirs.values())).glob(pattern)})
    files = {}
    for split, root in dirs.items():
        paths = sorted(root.glob(pattern))
        files[split] = hf_parquet(out / f"{split}.parquet",
                                  {column: [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
                                   "label": [names.index(p.parent.name) for p in paths]},
                                  {"label": names}, set(), {column: kind})
    return files, names


@contextlib.contextmanager
def live_server(app):
    """``app`` served by uvicorn on a free loopback port, in a thread: yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def hf_inference_client(url: str, monkeypatch):
    """huggingface_hub's InferenceClient pointed at a local service. Its offline mode (HF_HUB_OFFLINE=1, set
    for every test) refuses every URL, loopback included: lifted for this client only."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(model=url)
