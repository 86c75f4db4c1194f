"""CTC speech models (wav2vec2, HuBERT, WavLM, w2v-BERT ... ``*ForCTC``) for speech recognition: the training
forward and greedy decoding (``fmtune.models.build`` creates them; saving, loading and strategies go
through ``fmtune.models.causal_lm`` as for the other models that decode; the transcripts' encoding
and the CTC loss are the task's, ``fmtune.tasks.speech``).

The encoder reads the waveform (``fmtune.models.hf_remote.waveform_states``: group-norm models in
groups of equal length, so a transcript never depends on its batch), or w2v-BERT SeamlessM4T's
stacked filterbank (``fmtune.data.audio.StackedFbank``); the CTC head gives one distribution over
characters per 20-ms frame. Frames past a clip's end are set to emit the blank
with certainty: every alignment of the clip's own frames then extends over them in exactly one
way, so the CTC loss over the padded batch is the loss over each clip's frames (tested against
transformers' own loss). Decoding is greedy: the most likely token per frame, repeats merged,
blanks dropped (the tokenizer's own ``decode``).
"""

from __future__ import annotations

import json
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtune.errors import ModelError
from fmtune.models.causal_lm import CTC_FAMILY as FAMILY  # noqa: F401  (build names the family by it)
from fmtune.models.causal_lm import ctc_head
from fmtune.models.wrapped import plain
from fmtune.tasks.speech import transcribe_clips

WORD_DELIMITER = "|"
# CTC models beyond the wav2vec2-style encoders (build.AUDIO_ENCODERS): Parakeet (NVIDIA's FastConformer over NeMo's
# log-mel features, a SentencePiece vocabulary, its head a 1x1 convolution ``ctc_head``)
CTC_ONLY_TYPES = ("parakeet_ctc",)


def encoder_of(lm: nn.Module) -> nn.Module:
    """The encoder of a ``*ForCTC`` model (wav2vec2's ``wav2vec2``, HuBERT's ``hubert`` ...; Parakeet's ``encoder``)."""
    return getattr(lm, lm.base_model_prefix, None) or lm.encoder


def new_vocabulary(chars: list[str]) -> Any:
    """A character vocabulary for a fresh CTC head, as wav2vec2's own fine-tuning recipe builds one:
    the pad token ``<pad>`` (id 0) is the blank, ``<unk>``, ``|`` between words, then ``chars``."""
    from transformers import Wav2Vec2CTCTokenizer

    tokens = ["<pad>", "<unk>", WORD_DELIMITER, *[c for c in chars if c not in (WORD_DELIMITER, " ")]]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        return Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", bos_token=None,
                                    eos_token=None, word_delimiter_token=WORD_DELIMITER)


def create(path: Path | str, config: Any, init: str, chars: list[str] | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local CTC folder: ``*ForCTC`` weights and its character vocabulary. An
    encoder without a CTC head or vocabulary (a pretrained-only wav2vec2-base, HuBERT, WavLM ...)
    gets a vocabulary of ``chars`` (the training transcripts' characters, lower case) and a fresh
    head over it."""
    from transformers import AutoModelForCTC, AutoTokenizer

    archs = getattr(config, "architectures", None) or []
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    fresh = tokenizer is None or not any(a.endswith("ForCTC") for a in archs)
    if fresh:
        if not chars:
            raise ModelError(f"{path} is a {config.model_type} encoder without a CTC head and vocabulary "
                             f"(architectures: {', '.join(archs) or '?'}; no vocab.json / tokenizer) and there are "
                             "no training transcripts to build one from: speech recognition fine-tunes it with "
                             "--data (a table of audio paths and transcripts), or a *ForCTC checkpoint or a "
                             "Whisper model; for audio classification use --task audio-classification")
        tokenizer = new_vocabulary(chars)
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    try:
        if init != "pretrained":
            model = AutoModelForCTC.from_config(config, dtype=torch.float32)
        else:  # (transformers' report of the fresh head as missing weights is silenced with its logging: models.build)
            model = AutoModelForCTC.from_pretrained(path, config=config, dtype=torch.float32,
                                                    ignore_mismatched_sizes=fresh)
    except Exception as e:
        raise ModelError(f"cannot load the CTC model at {path}: {e}") from None
    char_ids = [i for t, i in tokenizer.get_vocab().items() if len(t) == 1]
    if tokenizer.pad_token_id is None or max([tokenizer.pad_token_id, *char_ids]) >= model.config.vocab_size:
        raise ModelError(f"{path}: the tokenizer (pad {tokenizer.pad_token!r}, id {tokenizer.pad_token_id}; characters "
                         f"up to id {max(char_ids, default=-1)}) does not fit the CTC head ({model.config.vocab_size} "
                         "outputs, the blank at the pad token)")
    return model, tokenizer


class CTCLogits(nn.Module):
    """What training batches are fed to: log-probabilities per frame (batch x frames x vocabulary),
    frames past each clip's end set to the blank with certainty (see the module doc)."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def forward(self, input_values: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None) -> types.SimpleNamespace:
        from fmtune.models.hf_remote import waveform_states

        lm = plain(self.model)
        hidden, mask = waveform_states(encoder_of(lm), input_values if input_values is not None else input_features,
                                       frame_mask)
        dropout = getattr(lm, "dropout", None)  # (wav2vec2's before its head; Parakeet has none)
        head = getattr(lm, ctc_head(lm))
        logits = head(dropout(hidden) if isinstance(dropout, nn.Module) else hidden).float().log_softmax(-1)
        if mask is not None and not bool(mask.all()):
            blank = torch.full_like(logits[0, 0], -1e4)  # (log 0, kept finite for the gradient)
            blank[lm.config.pad_token_id] = 0.0
            logits = torch.where(mask[..., None].bool(), logits, blank)
        return types.SimpleNamespace(logits=logits)

    def transcribe(self, ds: Any, rows: list[int], batch_size: int, device: Any, language: str | None = None,
                   on_batch: Any = None) -> list[str]:
        return transcribe(self.model, self.tokenizer, ds, rows, batch_size, device, on_batch)


def transcribe(model: nn.Module, tokenizer: Any, ds: Any, rows: list[int], batch_size: int, device: Any,
               on_batch: Any = None) -> list[str]:
    """Greedy CTC transcripts of clips ``rows`` of ``ds`` (``fmtune.tasks.speech.CTCData``): every
    window of every clip, in batches of similar length; a clip's windows joined in order."""
    from fmtune.models.hf_remote import output_frames

    net = CTCLogits(model, tokenizer)

    def decode(windows: list[torch.Tensor]) -> list[str]:
        batch = ds.waveforms(windows)
        logits = net(**{k: v.to(device) for k, v in batch.items()}).logits
        lengths = output_frames(plain(model), batch["frame_mask"].sum(-1)).tolist()
        return [tokenizer.decode(best[:n].tolist()).strip() for best, n in zip(logits.argmax(-1).cpu(), lengths)]

    return transcribe_clips(model, ds, rows, batch_size, decode, on_batch)


def write_extra(bundle: Any, folder: Path) -> None:
    """The feature extractor beside the model: the folder is a whole transformers CTC model
    (``AutoModelForCTC`` + ``AutoProcessor``)."""
    from fmtune.data.audio import feature_extractor

    feature_extractor(bundle.audio).save_pretrained(folder)
