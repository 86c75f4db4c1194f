"""Encoder-decoder speech models (Whisper; Moonshine, which reads the waveform) for speech recognition: the
training forward and batched greedy transcription with a KV cache (``fmtune.models.build`` creates, saves and loads
them).

Moonshine reads the waveform itself, in windows of up to 30 s padded with zeros to the longest of the batch; its
first convolution's group norm spans the window, so its windows are encoded in groups of equal length
(``hf_remote.waveform_states``) and a transcript never depends on its batch. The rest of this doc is Whisper's.

Whisper reads a fixed 30-second window (transformers' encoder refuses anything else): a 3-second
clip padded to 30 s costs ten times its own compute in the encoder and gives the decoder 1,500
positions to attend to at every token. Here a clip is read in buckets of ``BUCKET_SECONDS``: the
clip, then Whisper's own padding value (the silence after a clip) up to the next multiple of 5 s.
Fine-tuning learns the shorter context; the pretrained model has not, and reads short real speech
badly in it (on 22 clips of real speakers, ``bench/real_speech.py``: WER 0.94 in 5 s buckets, from
loops like "5 5 5 5 ...", against 0.10 in its 30 s window). So a model fmtune has not trained (the
zero-shot baseline, the pretrained candidate of the first validation) reads the whole window, and
a model fmtune trains is marked (``bucketed`` in its audio settings, fmtune.json) from its first
training step on and read in buckets from then on. The padding stays unmasked, as in Whisper's
own training, and a clip's bucket does not depend on the other clips of its batch, so neither
does its transcript.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtune.models.causal_lm import SPEECH_FAMILY as FAMILY  # noqa: F401  (build names the family by it)
from fmtune.models.wrapped import plain
from fmtune.tasks.speech import BUCKET_SECONDS, prefix_ids, transcribe_clips  # noqa: F401  (BUCKET_SECONDS: the module doc's)

# Whisper's decoder holds 448 positions for a 30-second window: at most this many tokens per second
# of audio are decoded (a model that loops on a phrase stops there, not at the decoder's end)
TOKENS_PER_SECOND = 448 / 30
WAVEFORM_SPEECH_TYPES = ("moonshine",)  # encoder-decoders that read the waveform (a 16 kHz window, zero-padded)
FBANK_SPEECH_TYPES = ("speech_to_text",)  # encoder-decoders that read a Kaldi filterbank (padded, masked)
SPEECH_MODEL_TYPES = ("whisper", *WAVEFORM_SPEECH_TYPES, *FBANK_SPEECH_TYPES)
BUCKETED = "bucketed"  # key of a model's audio settings: fmtune trained it in buckets (read it in them)


def max_target_positions(model: nn.Module) -> int:
    config = plain(model).config
    return int(getattr(config, "max_target_positions", None) or config.max_position_embeddings)


def encode(model: nn.Module, input_features: torch.Tensor | None = None, input_values: torch.Tensor | None = None,
           frame_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's states and the mask of its frames that cover the clip (None: every frame): Whisper's of
    log-mel windows of any length up to its own (padding unmasked), Moonshine's of zero-padded waveform windows,
    Speech2Text's of zero-padded filterbank frames (``frame_mask``: theirs); the last two in groups of equal length
    (``hf_remote.waveform_states``), so that a window's states never depend on its batch."""
    from fmtune.models.hf_remote import waveform_states, whisper_states

    encoder = plain(model).get_encoder()
    if input_values is not None:
        return waveform_states(encoder, input_values, frame_mask, grouped=True)
    if frame_mask is not None:  # Speech2Text: filterbank frames, in groups of equal length (its second convolution
        return waveform_states(encoder, input_features, frame_mask, grouped=True)  # would read the first's padding)
    return whisper_states(encoder, input_features)[0], None


def _decode(decoder: nn.Module, states: torch.Tensor, mask: torch.Tensor | None, **kw: Any) -> Any:
    """``decoder`` over the encoder's ``states`` (attending to the frames of ``mask`` only, where given)."""
    return decoder(encoder_hidden_states=states, **({"encoder_attention_mask": mask} if mask is not None else {}),
                   **kw)


class SpeechLogits(nn.Module):
    """What training batches are fed to: the decoder's logits at the positions in ``target_index``
    (flat into batch x length) only: the transcript's tokens, never the prefix or the padding."""

    def __init__(self, model: nn.Module, tokenizer: Any, audio: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # what evaluation decodes with
        self.audio = audio  # the bundle's audio settings: ``bucketed`` once a training step has run

    def forward(self, decoder_input_ids: torch.Tensor, target_index: torch.Tensor,
                input_features: torch.Tensor | None = None, input_values: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None) -> types.SimpleNamespace:
        if self.training and input_features is not None and frame_mask is None:  # Whisper: trained in buckets
            self.audio[BUCKETED] = True  # from here on: read in them (saved with the model, fmtune.json)
        lm = plain(self.model)
        states, mask = encode(lm, input_features, input_values, frame_mask)
        hidden = _decode(lm.get_decoder(), states, mask, input_ids=decoder_input_ids, use_cache=False)[0]
        picked = hidden.flatten(0, 1).index_select(0, target_index)
        return types.SimpleNamespace(logits=lm.get_output_embeddings()(picked))

    def transcribe(self, ds: Any, rows: list[int], batch_size: int, device: Any, language: str | None = None,
                   on_batch: Any = None) -> list[str]:
        """``transcribe`` with this model and tokenizer (what the task's evaluation calls), in buckets once the model
        has been trained in them, else in the whole window."""
        return transcribe(self.model, self.tokenizer, ds, rows, batch_size, device, language, on_batch,
                          full_window=not self.audio.get(BUCKETED, False))


def _suppressed(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the model's generation config never lets it choose, and not first (ids past
    the vocabulary, as a config of another model would give, are left out)."""
    gen = getattr(model, "generation_config", None)
    vocab = model.get_output_embeddings().out_features

    def ids(name: str) -> torch.Tensor:
        return torch.tensor([i for i in (getattr(gen, name, None) or []) if 0 <= i < vocab], dtype=torch.long)

    return ids("suppress_tokens"), ids("begin_suppress_tokens")


def greedy(model: nn.Module, inputs: dict[str, torch.Tensor], prefix: list[int], eot: int,
           max_new: int | list[int]) -> list[list[int]]:
    """Greedy decoding of a batch of windows (all of one width): the encoder once, then one
    decoder step per token for the rows still decoding, with the self- and cross-attention keys
    and values cached (a row that has ended leaves the batch and its cache: a pretrained model
    looping on noise costs its own steps only); the model's suppressed tokens never chosen (and
    its begin-suppressed ones not first). ``max_new``: the most tokens of every window, or of each (a window's own
    limit, so a transcript that loops stops where it would alone). Returns each window's tokens before the end of
    text. ``inputs``: what ``encode`` reads (a batch of ``SpeechData.inputs``)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from fmtune.models.causal_lm import _cache_arg, _cache_of

    lm = plain(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    every, first = _suppressed(lm)
    states, mask = encode(lm, **inputs)
    rows, device = states.shape[0], states.device
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    step_in = torch.tensor([prefix] * rows, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # the batch rows still decoding, in cache order
    out: list[list[int]] = [[] for _ in range(rows)]
    limits = torch.tensor(max_new if isinstance(max_new, list) else [max_new] * rows, device=device)
    key = _cache_arg(decoder)
    for step in range(int(limits.max()) if rows else 0):
        res = _decode(decoder, states, mask, input_ids=step_in, use_cache=True, **{key: cache})
        cache = _cache_of(res)
        logits = head(res[0][:, -1]).float()
        if len(every):
            logits[:, every] = -math.inf
        if step == 0 and len(first):
            logits[:, first] = -math.inf
        nxt = logits.argmax(-1)
        for r, t in zip(active.tolist(), nxt.tolist()):
            if t != eot:
                out[r].append(t)
        going = (nxt != eot) & (limits > step + 1)
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            states, active, nxt, limits = states[keep], active[keep], nxt[keep], limits[keep]
            mask = None if mask is None else mask[keep]
        step_in = nxt[:, None]
    return out


def transcribe(model: nn.Module, tokenizer: Any, ds: Any, rows: list[int], batch_size: int, device: Any,
               language: str | None = None, on_batch: Any = None, full_window: bool = False) -> list[str]:
    """The transcripts of clips ``rows`` of ``ds`` (a ``fmtune.tasks.speech.SpeechData``): every
    window of every clip, in batches of one bucket width and similar length (``full_window``: each padded to the
    encoder's whole window, as Whisper was pretrained), decoded greedily; a clip's windows joined in order.
    ``on_batch(n)`` is told of each batch's clips done."""
    prefix = prefix_ids(tokenizer, language, model)
    eot = tokenizer.eos_token_id
    room = max_target_positions(model) - len(prefix)

    def decode(windows: list[torch.Tensor]) -> list[str]:
        limits = [min(room, math.ceil(w.shape[-1] * ds.hop_seconds * TOKENS_PER_SECOND) + 8) for w in windows]
        inputs = {k: v.to(device) for k, v in ds.inputs(windows, full_window).items()}
        tokens = greedy(model, inputs, prefix, eot, limits)
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    # (Whisper: a batch holds windows of one bucket; Moonshine's and Speech2Text's encoders group them by length)
    return transcribe_clips(model, ds, rows, batch_size, decode, on_batch,
                            width=None if ds.padded else lambda w: ds.width(w, full_window))


def write_extra(bundle: Any, folder: Path) -> None:
    """The feature extractor beside the model, so the folder is a whole transformers speech model."""
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor

    from fmtune.data.audio import LOG_MEL, feature_extractor
    from fmtune.zoo.models import resolve

    spec = bundle.audio
    try:
        _, path = resolve(bundle.source)
        (WhisperFeatureExtractor if spec["frontend"] == LOG_MEL else AutoFeatureExtractor).from_pretrained(
            path).save_pretrained(folder)
    except Exception:  # the source is gone: the settings fmtune reads are in fmtune.json
        if spec["frontend"] != LOG_MEL:  # (Moonshine's: a Wav2Vec2FeatureExtractor; Speech2Text's own)
            feature_extractor(spec).save_pretrained(folder)
            return
        WhisperFeatureExtractor(feature_size=spec["n_mels"], sampling_rate=spec["sampling_rate"],
                                hop_length=spec["hop_length"], n_fft=spec["n_fft"]).save_pretrained(folder)
