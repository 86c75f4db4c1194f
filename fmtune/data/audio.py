"""Audio as a model reads it: decoded, mono, resampled, cut into windows, as log-mel features
(Whisper) or as the normalised waveform itself (wav2vec2, HuBERT, WavLM: ``AudioSpec.frontend``).

Files are decoded with soundfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF: whatever libsndfile
reads; M4A/AAC, MP4, WebM, WMA and AMR with FFmpeg's decoders through PyAV), mixed down to mono
and resampled to the model's rate with scipy's polyphase filter
(torchaudio has no release for torch 2.13). A clip longer than the model's window is cut into
consecutive windows; each window becomes a log-mel spectrogram computed exactly as Whisper's
feature extractor does (Hann STFT, mel filters, log10, 8-decade floor, (x + 4) / 4) but only
over the clip's own frames: a 1-second clip costs 100 frames, not Whisper's padded 3,000, and
the encoder reads only those (positions sliced, padding masked). A sequence-level head averages
its pooled features over a clip's windows.

Raw-waveform encoders (wav2vec2 and its kin) read the samples: each clip is normalised to zero
mean and unit variance when the model's feature extractor says so (``do_normalize``), as
transformers' Wav2Vec2FeatureExtractor does, and padded with zeros in a batch.

Spectrogram transformers (AST) read a Kaldi-style log mel filterbank of a fixed number of frames
(their position embeddings cover exactly ``frames``: 1,024 = 10.24 s for the AudioSet models),
normalised with the mean and deviation of their pretraining data, as transformers'
ASTFeatureExtractor computes it (``Fbank``): a shorter window is padded with zero filterbank
frames, a longer clip is cut into windows of ``frames``.

w2v-BERT (wav2vec2-bert: w2v-BERT 2.0, the MMS-style low-resource recognisers fine-tuned from it)
reads SeamlessM4T's filterbank (``StackedFbank``): 80 Kaldi mel bands every 10 ms, each band
normalised over the window's frames, two consecutive frames stacked into one input of 160 values
(20 ms), padded with zeros in a batch and ``frame_mask`` marking real ones, as transformers'
SeamlessM4TFeatureExtractor computes it. Speech2Text reads the same filterbank unstacked (one frame an input),
each band normalised by its biased deviation (``AudioSpec.extractor``: Speech2TextFeatureExtractor's); Parakeet
(NVIDIA's FastConformer CTC models) NeMo's log-mel spectrogram, each band normalised over the clip
(``ParakeetMel``), read the same way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fmtune.data.dataset import skip_bad
from fmtune.data.readers import (
    AUDIO_SUFFIXES,
    FFMPEG_AUDIO_SUFFIXES,
    media_cell,
    media_root_hint,
    read_class_folder,
    require_column,
    row_label,
    table_base,
)
from fmtune.errors import DataError

MIN_SECONDS = 0.005  # shorter is not a sound a model can tell anything from: an error
PAD_TO_SECONDS = 1.0  # shorter clips are padded with silence to this length (context for the encoder)
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below this is silence (warned, not refused)


LOG_MEL, WAVEFORM, FBANK, STACKED = "log-mel", "waveform", "fbank", "stacked-fbank"
# a batch's key for the model's input (the one transformers' feature extractor of each kind of model uses)
INPUT_KEY = {LOG_MEL: "input_features", WAVEFORM: "input_values", FBANK: "input_values", STACKED: "input_features"}
# what wav2vec2-style encoders read (the CTC models of speech recognition): one output frame per input frame or
# per 320 samples, masked where padded
ENCODER_FRONTENDS = (WAVEFORM, STACKED)
# AudioSpec.extractor of a stacked-fbank read one frame an input (stride 1): Speech2Text's Kaldi filterbank,
# Parakeet's (NeMo's) log-mel spectrogram
SPEECH2TEXT, PARAKEET = "Speech2TextFeatureExtractor", "ParakeetFeatureExtractor"


@dataclass(frozen=True)
class AudioSpec:
    """How a model reads audio: the log-mel settings of its feature extractor (or the raw waveform,
    normalised or not) and its window."""
    # LOG_MEL (Whisper) | WAVEFORM (wav2vec2, HuBERT, WavLM ...) | FBANK (AST) | STACKED (w2v-BERT)
    frontend: str = LOG_MEL
    normalize: bool = True  # waveform: zero mean, unit variance per clip; fbank: (x - mean) / (2 std)
    sampling_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    window_seconds: float = 30.0  # the longest stretch the encoder reads at once (model.audio_window)
    encoder_seconds: float = 30.0  # what the encoder holds (Whisper: 1,500 positions = 30 s); window <= this
    frames: int = 0  # fbank: the frames every window is padded to (the model's max_length)
    mean: float = 0.0  # fbank: the filterbank values' mean and deviation in the model's pretraining data
    std: float = 1.0
    stride: int = 1  # stacked-fbank: consecutive frames stacked into one input (SeamlessM4T's stride, 2)
    # stacked-fbank: transformers' feature extractor whose features these are (SeamlessM4T's unless named:
    # Speech2TextFeatureExtractor's deviation over a window is the biased one), and the input frames the
    # encoder's convolutions fold into one position (Speech2Text: 4)
    extractor: str = ""
    subsample: int = 1

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sampling_rate))

    @property
    def encoder_frames(self) -> int:
        """Log-mel frames the encoder holds (even: its second convolution halves them)."""
        n = math.ceil(self.encoder_seconds * self.sampling_rate / self.hop_length)
        return n - n % 2

    @property
    def frame_seconds(self) -> float:
        """Seconds of one unit of a window's last dimension: a sample, a (stacked) filterbank or log-mel frame."""
        if self.frontend == WAVEFORM:
            return 1 / self.sampling_rate
        return self.hop_length * (self.stride if self.frontend == STACKED else 1) / self.sampling_rate

    @property
    def input_key(self) -> str:
        return INPUT_KEY[self.frontend]

    @property
    def fbank_padding(self) -> float:
        """What a padded frame of a filterbank window holds: zero, normalised."""
        return -self.mean / (2 * self.std) if self.normalize else 0.0

    def positions(self, units: int) -> int:
        """Encoder positions of a window of ``units`` (what its last dimension counts: log-mel frames, samples,
        stacked frames): Whisper halves its frames, wav2vec2's convolutions give one per 320 samples, an AST reads
        its fixed window as patches of 16 x 16 every 10 frames and bands (and 2 more tokens)."""
        if self.frontend == LOG_MEL:
            return max(1, -(-units // 2))
        if self.frontend == WAVEFORM:
            return max(1, units // 320)
        if self.frontend == FBANK:
            return ((self.n_mels - 16) // 10 + 1) * ((self.frames - 16) // 10 + 1) + 2
        return max(1, -(-units // self.subsample))

    def as_dict(self) -> dict[str, Any]:
        return {"frontend": self.frontend, "normalize": self.normalize, "sampling_rate": self.sampling_rate,
                "n_mels": self.n_mels, "n_fft": self.n_fft,
                "hop_length": self.hop_length, "window_seconds": self.window_seconds,
                "encoder_seconds": self.encoder_seconds,
                **({"frames": self.frames, "mean": self.mean, "std": self.std} if self.frontend == FBANK else {}),
                **({"stride": self.stride, "subsample": self.subsample,
                    **({"extractor": self.extractor} if self.extractor else {})} if self.frontend == STACKED else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioSpec:
        keys = ("frontend", "normalize", "sampling_rate", "n_mels", "n_fft", "hop_length", "window_seconds",
                "encoder_seconds", "frames", "mean", "std", "stride", "extractor", "subsample")
        return cls(**{k: d[k] for k in keys if k in d})


def read_audio_folder(path: Path, column: str = "audio", held_out: bool = True,
                      label_pattern: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders of audio files -> rows (audio path, label = sub-folder name; or read from the
    file names, the Free Spoken Digit Dataset's recordings/); ``held_out``: the files its split lists name (Speech
    Commands) left out (``readers.read_class_folder``)."""
    return read_class_folder(path, AUDIO_SUFFIXES, column, "dog/1.wav", "audio files", split_lists_held_out=held_out,
                             label_pattern=label_pattern)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate).limit_denominator(1000)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def load_audio(source: Any, rate: int, where: str = "") -> np.ndarray:
    """A file path, bytes or file object -> float32 mono waveform at ``rate`` Hz. A DataError names
    ``where`` (or the file) for a missing, unsupported, unreadable, empty or too-short file; silence
    only is warned about."""
    import io

    import soundfile as sf

    name = where or str(source)
    ffmpeg = False
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{name}: audio file not found: {path}" if where else f"{path}: audio file not found")
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise DataError(f"{name}: unsupported audio format {path.suffix or '(no suffix)'!r}; "
                            f"readable: {', '.join(sorted(AUDIO_SUFFIXES))}")
        ffmpeg = path.suffix.lower() in FFMPEG_AUDIO_SUFFIXES
    elif isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        wave, sr = _ffmpeg_decode(source, name) if ffmpeg else sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        try:  # (an upload's bytes, a file named .wav: M4A, WebM ... that FFmpeg reads)
            if not isinstance(source, (str, Path)):
                source.seek(0)
            wave, sr = _ffmpeg_decode(source, name)
        except DataError:
            raise DataError(f"{name}: not readable audio ({type(e).__name__}: {e})") from None
    if wave.shape[0] == 0:
        raise DataError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(wave).all():
        raise DataError(f"{name}: the audio holds NaN or infinite samples")
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if len(wave) / sr < MIN_SECONDS:
        raise DataError(f"{name}: the clip lasts {1000 * len(wave) / sr:.1f} ms; at least "
                        f"{1000 * MIN_SECONDS:g} ms is needed")
    if np.abs(wave).max() < SILENCE_PEAK:
        warnings.warn(f"{name}: the clip is silent (peak amplitude {np.abs(wave).max():.1e})", stacklevel=2)
    return np.ascontiguousarray(resample(wave, sr, rate), dtype=np.float32)


def _ffmpeg_decode(source: Any, name: str) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the sample rate of the first audio stream of ``source`` (a path or a file
    object), decoded by FFmpeg through PyAV: the containers libsndfile does not open (``FFMPEG_AUDIO_SUFFIXES``)."""
    try:
        import av
    except ImportError:
        raise DataError(f"{name}: reading this audio (AAC, WebM, WMA ...) needs PyAV: pip install av") from None
    chunks = []
    try:
        with av.open(str(source) if isinstance(source, (str, Path)) else source) as container:
            if not container.streams.audio:
                raise DataError(f"{name}: the file holds no audio stream")
            stream = container.streams.audio[0]
            planar = av.AudioResampler(format="fltp")  # float samples, a row per channel, at the stream's own rate
            for frame in container.decode(stream):
                chunks += [f.to_ndarray() for f in planar.resample(frame)]
            chunks += [f.to_ndarray() for f in planar.resample(None)]
            rate = int(stream.codec_context.sample_rate or stream.rate)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DataError(f"{name}: not readable audio ({type(e).__name__}: {e})") from None
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.ascontiguousarray(np.concatenate(chunks, axis=1).T, dtype=np.float32), rate


class LogMel:
    """Whisper's log-mel spectrogram of one window (its own frames only; see the module doc)."""

    def __init__(self, spec: AudioSpec):
        from transformers.audio_utils import mel_filter_bank

        self.spec = spec
        self.filters = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=1 + spec.n_fft // 2, num_mel_filters=spec.n_mels, min_frequency=0.0,
            max_frequency=spec.sampling_rate / 2, sampling_rate=spec.sampling_rate, norm="slaney",
            mel_scale="slaney")).float()
        self.window = torch.hann_window(spec.n_fft)

    def frames(self, samples: int) -> int:
        """Frames of a window of ``samples`` (even: the encoder's second convolution has stride 2)."""
        frames = math.ceil(samples / self.spec.hop_length)
        return frames + frames % 2

    def mel_power(self, wave: np.ndarray) -> torch.Tensor:
        """The mel power spectrogram (n_mels, frames) of the window's own frames."""
        n = self.frames(len(wave))
        # zeros after the clip, as Whisper pads to its window before the STFT
        padded = np.zeros(n * self.spec.hop_length + self.spec.n_fft, dtype=np.float32)
        padded[: len(wave)] = wave
        stft = torch.stft(torch.from_numpy(padded), self.spec.n_fft, self.spec.hop_length, window=self.window,
                          return_complex=True)
        return self.filters.T @ (stft[:, :n].abs() ** 2).contiguous()

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        log_spec = self.mel_power(wave).clamp(min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


class Fbank:
    """A window's Kaldi-style log mel filterbank (n_mels x frames), its own frames only, as
    transformers' ASTFeatureExtractor computes it without torchaudio (25 ms Hann frames every
    10 ms, pre-emphasis 0.97, DC offset removed, 512-point FFT, mel filters from 20 Hz on the Kaldi
    scale, natural log), normalised with the model's mean and deviation."""

    FRAME, FFT = 400, 512  # samples of a frame at 16 kHz (25 ms), FFT points
    WINDOW, SCALE = "hann", 1.0  # the frame's window; the samples' scale (Kaldi's: 16-bit integers)

    def __init__(self, spec: AudioSpec):
        from transformers.audio_utils import mel_filter_bank, window_function

        self.spec = spec
        with warnings.catch_warnings():  # (128 bands leave one filter empty: the models were trained so)
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            self.filters = mel_filter_bank(num_frequency_bins=1 + self.FFT // 2, num_mel_filters=spec.n_mels,
                                           min_frequency=20, max_frequency=spec.sampling_rate // 2,
                                           sampling_rate=spec.sampling_rate, norm=None, mel_scale="kaldi",
                                           triangularize_in_mel_space=True)
        self.window = window_function(self.FRAME, self.WINDOW, periodic=False)

    def log_mel(self, wave: np.ndarray) -> torch.Tensor:
        """The window's log mel filterbank (n_mels x frames, one frame at least)."""
        from transformers.audio_utils import spectrogram

        wave = np.pad(wave, (0, max(0, self.FRAME - len(wave)))) * self.SCALE
        fbank = spectrogram(wave, self.window, frame_length=self.FRAME, hop_length=self.spec.hop_length,
                            fft_length=self.FFT, power=2.0, center=False, preemphasis=0.97, mel_filters=self.filters,
                            log_mel="log", mel_floor=1.192092955078125e-07, remove_dc_offset=True)
        return torch.from_numpy(np.asarray(fbank, dtype=np.float32))

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        fbank = self.log_mel(wave)[:, : self.spec.frames]
        return (fbank - self.spec.mean) / (2 * self.spec.std) if self.spec.normalize else fbank


class StackedFbank(Fbank):
    """SeamlessM4T's features of a window (w2v-BERT), as its SeamlessM4TFeatureExtractor computes them: the Kaldi
    filterbank (a Povey window over 16-bit-scaled samples), each mel band normalised to zero mean and unit variance
    over the window's frames, then every ``stride`` consecutive frames stacked into one input ((n_mels * stride) x
    frames // stride; an odd last frame is dropped, as the extractor masks it). Speech2Text's (``extractor``
    SPEECH2TEXT, stride 1) are the same filterbank normalised by the biased deviation (its utterance CMVN; 1e-7 is
    added to the variance here too, where Speech2Text's extractor divides a constant band, silence, by zero)."""

    WINDOW, SCALE = "povey", 2.0**15

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        fbank = self.log_mel(wave).T  # (frames, n_mels)
        if self.spec.normalize and fbank.shape[0] > 1:
            unbiased = self.spec.extractor != SPEECH2TEXT
            fbank = (fbank - fbank.mean(0)) / (fbank.var(0, unbiased=unbiased) + 1e-7).sqrt()
        k = self.spec.stride
        n = fbank.shape[0] // k
        return fbank[: n * k].reshape(n, k * fbank.shape[1]).T.contiguous()

    @staticmethod
    def unstacked(spec: AudioSpec, feats: torch.Tensor) -> torch.Tensor:
        """Stacked features ((n_mels * stride) x frames) back as the filterbank (n_mels x frames * stride)."""
        return feats.T.reshape(-1, spec.n_mels).T


# a wav2vec2-style encoder's shortest input (the waveform's, or w2v-BERT's): its SpecAugment (on in training, as in
# its own recipe) masks spans of 10 frames of 20 ms and transformers refuses a clip of fewer frames than that
WAVEFORM_MIN_SECONDS = 0.25


class ParakeetMel:
    """Parakeet's features of a window (NeMo's preprocessor), as transformers' ParakeetFeatureExtractor computes them:
    pre-emphasis 0.97, a centred 512-point STFT of a 25-ms symmetric Hann window every 10 ms (zeros around the
    clip), Slaney mel filters from 0 Hz, log(power + 2^-24), the clip's frames only (one per 10 ms), each band
    normalised to zero mean and unit (unbiased) deviation over them, 1e-5 added to the deviation. Returned as
    ``StackedFbank`` returns its features (n_mels x frames)."""

    WINDOW = 400  # samples of a frame at 16 kHz (25 ms)

    def __init__(self, spec: AudioSpec):
        from transformers.audio_utils import mel_filter_bank

        self.spec = spec
        self.filters = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=1 + spec.n_fft // 2, num_mel_filters=spec.n_mels, min_frequency=0.0,
            max_frequency=spec.sampling_rate / 2, sampling_rate=spec.sampling_rate, norm="slaney",
            mel_scale="slaney", dtype=np.float32).T).contiguous()
        self.window = torch.hann_window(self.WINDOW, periodic=False)

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        x = torch.cat([x[:1], x[1:] - 0.97 * x[:-1]])
        stft = torch.stft(x, self.spec.n_fft, hop_length=self.spec.hop_length, win_length=self.WINDOW,
                          window=self.window, return_complex=True, pad_mode="constant")
        n = max(1, (len(x) + 2 * (self.spec.n_fft // 2) - self.spec.n_fft) // self.spec.hop_length)
        mel = (self.filters @ stft[:, :n].abs().pow(2) + 2.0**-24).log()  # (n_mels, frames)
        if self.spec.normalize and n > 1:
            mel = (mel - mel.mean(1, keepdim=True)) / (mel.var(1, unbiased=True, keepdim=True).sqrt() + 1e-5)
        return mel


def windows(wave: np.ndarray, spec: AudioSpec) -> list[np.ndarray]:
    """A clip as consecutive windows of at most the model's window; a clip (or a last piece)
    shorter than PAD_TO_SECONDS is padded with silence to it (log-mel: context for the encoder), or,
    for a wav2vec2-style encoder, only to WAVEFORM_MIN_SECONDS (its own feature extractor leaves clips
    as they are, but silence would enter the clip's mean)."""
    step = spec.window_samples
    pieces = [wave[i:i + step] for i in range(0, len(wave), step)] or [wave]
    if len(pieces) > 1 and len(pieces[-1]) < PAD_TO_SECONDS * spec.sampling_rate:
        pieces[-1] = wave[-int(PAD_TO_SECONDS * spec.sampling_rate):]  # the last second, overlapping
    if spec.frontend == FBANK:  # padded with zero filterbank frames instead, as the model's extractor does
        least = Fbank.FRAME
    else:
        least = int((WAVEFORM_MIN_SECONDS if spec.frontend in ENCODER_FRONTENDS else PAD_TO_SECONDS)
                    * spec.sampling_rate)
    return [np.pad(p, (0, least - len(p))) if len(p) < least else p for p in pieces]


class AudioData(torch.utils.data.Dataset):
    """Clips as log-mel windows or waveform windows (fp16, computed once). A batch of clips is the
    batch of all their windows, padded to the longest, with ``frame_mask`` marking real frames (real
    samples, for a waveform) and ``clip_index`` telling which clip of the batch each window belongs to."""

    def __init__(self, clips: list[list[torch.Tensor]], targets: Any, spec: AudioSpec,
                 sources: list[str | bytes] | None = None, names: list[str] | None = None):
        self.clips, self.targets, self.spec = clips, targets, spec
        self.sources = sources or []  # each clip's file (bytes: a clip embedded in its table), where known
        self.names = names or [str(s) for s in self.sources]  # how reports and messages name each clip
        self.lengths = np.array([sum(w.shape[-1] for w in c) for c in clips])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> int:
        return i

    def memory_profile(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What a clip costs a forward pass (``fmtune.training.memory``): a batch holds all its windows."""
        return clips_profile(self.clips, self.spec)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        wins = [(row, w) for row, i in enumerate(idx) for w in self.clips[i]]
        if self.spec.frontend in ENCODER_FRONTENDS:
            return self._with_targets(encoder_batch([w for _, w in wins], self.spec), wins, idx)
        if self.spec.frontend == FBANK:  # (windows, frames, mel bins), every window padded to the model's frames
            feats = torch.full((len(wins), self.spec.frames, self.spec.n_mels), self.spec.fbank_padding)
            for j, (_, w) in enumerate(wins):
                feats[j, : w.shape[-1]] = w.float().T
            return self._with_targets({"input_values": feats}, wins, idx)
        # two frames of padding at least: the convolutions at a clip's end then always read the floor
        # value that follows it (as in Whisper's padded window), whatever else is in the batch; a window
        # as long as the encoder holds (30 s) has none, as in Whisper
        width = min(max(w.shape[-1] for _, w in wins) + 2, self.spec.encoder_frames)
        feats = torch.zeros((len(wins), self.spec.n_mels, width))
        mask = torch.zeros((len(wins), width), dtype=torch.long)
        for j, (_, w) in enumerate(wins):
            w = w.float()
            feats[j, :, : w.shape[-1]] = w
            feats[j, :, w.shape[-1]:] = w.min()  # the floor value, as Whisper's padded silence reads
            mask[j, : w.shape[-1]] = 1
        return self._with_targets({"input_features": feats, "frame_mask": mask}, wins, idx)

    def _with_targets(self, batch: dict[str, torch.Tensor], wins: list, idx: list[int]) -> dict[str, torch.Tensor]:
        batch["clip_index"] = torch.tensor([row for row, _ in wins], dtype=torch.long)
        if self.targets is not None:
            batch["labels"] = self.targets[idx]
        return batch


def clips_profile(clips: list[list[torch.Tensor]], spec: AudioSpec, per_window: bool = False,
                  width: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(encoder positions, positions of the longest window, waveform samples or None) of each clip, or of each
    window (``per_window``: datasets whose batches are of windows); ``width(window)``: what a window is padded to
    (default: its own length)."""
    units = [[width(w) if width else w.shape[-1] for w in c] for c in clips]
    if per_window:
        units = [[u] for c in units for u in c]
    positions = [[spec.positions(u) for u in c] for c in units]
    samples = np.array([sum(c) for c in units]) if spec.frontend == WAVEFORM else None
    return np.array([sum(p) for p in positions]), np.array([max(p) for p in positions]), samples


def encoder_batch(wins: list[torch.Tensor], spec: AudioSpec) -> dict[str, torch.Tensor]:
    """A wav2vec2-style encoder's windows padded with zeros to the longest, ``frame_mask`` 1 on real samples: the
    waveform (windows x samples), or stacked filterbank frames (windows x frames x features, ``StackedFbank``)."""
    width = max(w.shape[-1] for w in wins)
    stacked = spec.frontend == STACKED
    values = torch.zeros((len(wins), width, wins[0].shape[0]) if stacked else (len(wins), width))
    mask = torch.zeros((len(wins), width), dtype=torch.long)
    for j, w in enumerate(wins):
        values[j, : w.shape[-1]] = w.float().T if stacked else w.float()
        mask[j, : w.shape[-1]] = 1
    return {spec.input_key: values, "frame_mask": mask}


def normalized(wave: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (Wav2Vec2FeatureExtractor's do_normalize)."""
    return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


def features_of(waves: list[np.ndarray], spec: AudioSpec) -> list[list[torch.Tensor]]:
    """Each waveform as its windows' model input (fp16): log-mel features, or the waveform itself
    (normalised over the whole clip when the model's extractor does so)."""
    if spec.frontend == WAVEFORM:
        prep = normalized if spec.normalize else (lambda w: w)
        return [[torch.from_numpy(w).half() for w in windows(prep(np.asarray(wave, dtype=np.float32)), spec)]
                for wave in waves]
    mel = (ParakeetMel if spec.extractor == PARAKEET else
           {FBANK: Fbank, STACKED: StackedFbank}.get(spec.frontend, LogMel))(spec)
    return [[mel(w).half() for w in windows(np.asarray(wave, dtype=np.float32), spec)] for wave in waves]


def audio_dataset(df: pd.DataFrame, column: str, spec: AudioSpec, targets: torch.Tensor | None,
                  max_bad_fraction: float) -> tuple[AudioData, np.ndarray]:
    """Decode every clip of ``df[column]`` (paths relative to the table's folder); unreadable ones
    are dropped with a warning up to ``max_bad_fraction``, else a DataError lists them."""
    require_column(df, column, "audio path", "data.audio_column")
    src, base = df.attrs.get("source", ""), table_base(df)
    table = bool(src) and Path(src).is_file()
    kept, waves, bad, sources, names = [], [], [], [], []
    for i, value in enumerate(df[column].tolist()):
        p, name = media_cell(value, base)  # a path, or a clip embedded in the table (a Hugging Face Parquet)
        if p is None:
            bad.append(f"{row_label(df, i)}: column {column!r} is empty")
            continue
        where = f"{row_label(df, i)}: {name}" if table or isinstance(p, bytes) else name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                waves.append(load_audio(p, spec.sampling_rate, where))
        except DataError as e:
            bad.append(str(e))
            continue
        kept.append(i)
        sources.append(p if isinstance(p, bytes) else str(p))
        names.append(where if isinstance(p, bytes) else str(p))
    missing = [p for p, _ in (media_cell(v, base) for v in df[column]) if isinstance(p, Path) and not p.exists()]
    skip_bad(bad, len(df), src, max_bad_fraction, "audio files cannot be used", "unusable audio file(s)",
             media_root_hint(missing, base) if missing else "")
    keep = np.array(kept, dtype=np.int64)
    return AudioData(features_of(waves, spec), None if targets is None else targets[keep], spec, sources,
                     names), keep


def feature_extractor(audio: dict[str, Any]) -> Any:
    """transformers' feature extractor that computes what fmtune feeds the model (``bundle.audio``)."""
    from transformers import (
        ASTFeatureExtractor,
        ParakeetFeatureExtractor,
        SeamlessM4TFeatureExtractor,
        Speech2TextFeatureExtractor,
        Wav2Vec2FeatureExtractor,
        WhisperFeatureExtractor,
    )

    a = AudioSpec.from_dict(audio)
    if a.frontend == STACKED and a.extractor == PARAKEET:
        return ParakeetFeatureExtractor(feature_size=a.n_mels, sampling_rate=a.sampling_rate, hop_length=a.hop_length,
                                        n_fft=a.n_fft, win_length=ParakeetMel.WINDOW, preemphasis=0.97)
    if a.frontend == STACKED and a.extractor == SPEECH2TEXT:
        return Speech2TextFeatureExtractor(feature_size=a.n_mels, num_mel_bins=a.n_mels, sampling_rate=a.sampling_rate,
                                           padding_value=0.0, do_ceptral_normalize=a.normalize)
    if a.frontend == STACKED:
        return SeamlessM4TFeatureExtractor(feature_size=a.n_mels, num_mel_bins=a.n_mels, sampling_rate=a.sampling_rate,
                                           stride=a.stride, padding_value=0.0)
    if a.frontend == FBANK:
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")  # (see Fbank)
        return ASTFeatureExtractor(sampling_rate=a.sampling_rate, num_mel_bins=a.n_mels, max_length=a.frames,
                                   do_normalize=a.normalize, mean=a.mean, std=a.std)
    if a.frontend == WAVEFORM:
        return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=a.sampling_rate, padding_value=0.0,
                                        do_normalize=a.normalize, return_attention_mask=True)
    return WhisperFeatureExtractor(feature_size=a.n_mels, sampling_rate=a.sampling_rate, hop_length=a.hop_length,
                                   n_fft=a.n_fft)
