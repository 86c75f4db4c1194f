"""Audio classification: a clip -> one of K labels, on an audio encoder's pooled features (Whisper's
encoder by default), averaged over the clip's windows. Everything but reading the files is single-label
classification's: loss, metrics, probe baseline, report; the audio dataset is made where a model's
text or image datasets are (``Task.dataset``, from the bundle's kind)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fmtune.data.readers import read_table
from fmtune.tasks.base import TASKS
from fmtune.tasks.classification import Classification


@TASKS.register("audio-classification")
class AudioClassification(Classification):
    name = "audio-classification"
    description = ("one label per audio clip (Whisper encoder; a folder of class sub-folders, a table of paths, or a "
                   "list of CLASS/FILE paths)")
    modality = "audio"
    capabilities = frozenset({"stratified_split", "mistakes", "transfer", "embed", "robustness", "explain",
                              "split_lists", "usual_columns"})

    @classmethod
    def read_file(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        from fmtune.data.audio import read_audio_folder
        from fmtune.data.readers import AUDIO_SUFFIXES, folder_metadata, read_file_list

        p = Path(path)
        if p.is_dir() and folder_metadata(p) is not None:  # (Hugging Face's audiofolder layout)
            p = folder_metadata(p)
        elif p.is_dir():
            return read_audio_folder(p, data_cfg.audio_column, label_pattern=data_cfg.label_pattern)
        if p.suffix.lower() == ".txt":  # a split list of a class folder (Speech Commands' validation_list.txt)
            return read_file_list(p, AUDIO_SUFFIXES, data_cfg.audio_column, "audio files")
        return cls.labelled(read_table(p, data_cfg.encoding, data_cfg.audio_column, data_cfg), data_cfg)
