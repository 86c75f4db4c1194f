"""Audio classification: a clip -> one of K labels, on an audio encoder's pooled features (Whisper's
encoder by default), averaged over the clip's windows. Everything but the inputs is single-label
classification's: loss, metrics, probe baseline, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fmtune.data.readers import read_table
from fmtune.tasks.base import TASKS
from fmtune.tasks.classification import Classification


@TASKS.register("audio-classification")
class AudioClassification(Classification):
    name = "audio-classification"
    description = "one label per audio clip (Whisper encoder; a folder of class sub-folders or a table of paths)"
    modality = "audio"
    capabilities = frozenset({"stratified_split", "mistakes", "transfer", "embed"})

    @classmethod
    def read(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        from fmtune.data.audio import read_audio_folder

        p = Path(path)
        if p.is_dir():
            return read_audio_folder(p, data_cfg.audio_column)
        return read_table(p, data_cfg.encoding, data_cfg.audio_column)

    def dataset(self, df, bundle, data_cfg, with_targets=True, allow_unknown=False):
        from fmtune.data.audio import AudioSpec, audio_dataset
        from fmtune.data.readers import require_column

        targets = None
        if with_targets:
            column = self.target_column(data_cfg)
            require_column(df, column, "label", "data.label_column")
            targets = self.encode(df[column], df, column, allow_unknown)
        return audio_dataset(df, data_cfg.audio_column, AudioSpec.from_dict(bundle.audio), targets,
                             data_cfg.max_bad_fraction)

    def inputs(self, items: list[Any], bundle: Any) -> torch.utils.data.Dataset:
        """Decoded waveforms (``fmtune.data.audio.load_audio``) as the model reads them."""
        from fmtune.data.audio import AudioData, AudioSpec, features_of

        spec = AudioSpec.from_dict(bundle.audio)
        clips, digest = features_of([np.asarray(w, dtype=np.float32) for w in items], spec)
        return AudioData(clips, None, spec, digest)
