"""Audio classification: a linear probe on Whisper tiny.en's encoder read on the clip's own frames (as fmtune
reads it) against the same encoder read in its whole 30-s window (pooled over the clip's frames), over 5 random
stratified splits (70/30) of sonic-pi-samples (real instrument sounds) and espeak-commands. A study, not a default:

    .venv/bin/python bench/audio_window_probe.py > result.json   (about 12 minutes on 2 cores)

Measured 2026-12-05 (bench/results-2026-12-05-audio-window-probe-2core.json): sonic-pi 0.573 +- 0.072 (clip) vs
0.591 +- 0.036 (window), paired differences +0.16 to -0.09; espeak-commands 0.974 +- 0.004 vs 0.986 +- 0.000, the
window better in all 5 splits. The window costs up to 30x the encoder's time for a 1-s clip: not taken.
"""
import json
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler
from transformers import WhisperFeatureExtractor, WhisperModel

from fmtune.data.audio import load_audio, resample
from fmtune.models.hf_remote import whisper_states
from fmtune.zoo.datasets import DATASETS
from fmtune.zoo.models import resolve


def load_audio_pair(a):
    return resample(np.asarray(a[0], dtype=np.float32), a[1], 16000)


torch.set_num_threads(2)
_, path = resolve("whisper-tiny-en")
enc = WhisperModel.from_pretrained(path).encoder.eval()
fe = WhisperFeatureExtractor.from_pretrained(path)
out = {}
for name, test_frac in (("sonic-pi-samples", 0.3), ("espeak-commands", 0.3)):
    df = DATASETS.get(name).load()
    clip, win = [], []
    for a in df["audio"]:
        w = load_audio(a, 16000) if isinstance(a, str) else load_audio_pair(a)
        w = w[: 16000 * 30]
        x = fe(w, sampling_rate=16000, return_tensors="pt").input_features
        n2 = (max(2, int(np.ceil(len(w) / 160))) + 1) // 2
        with torch.inference_mode():
            win.append(enc(x).last_hidden_state[0][:n2].mean(0).numpy())
            clip.append(whisper_states(enc, x[:, :, : 2 * n2 + 2])[0][0][:n2].mean(0).numpy())
    y = df["label"].to_numpy()
    res = {}
    for k, X in (("clip", np.array(clip)), ("window", np.array(win))):
        accs = []
        for tr, te in StratifiedShuffleSplit(n_splits=5, test_size=test_frac, random_state=0).split(X, y):
            sc = StandardScaler().fit(X[tr])
            clf = LogisticRegressionCV(Cs=8, max_iter=3000).fit(sc.transform(X[tr]), y[tr])
            accs.append(float((clf.predict(sc.transform(X[te])) == y[te]).mean()))
        res[k] = {"mean": round(float(np.mean(accs)), 3), "std": round(float(np.std(accs)), 3), "accs": accs}
    out[name] = {"clips": len(y), "classes": int(len(set(y))), **res}
    print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
print(json.dumps({"bench": "audio classification probe: clip frames vs 30-s window", "model": "whisper-tiny-en",
                  "splits": "5 x StratifiedShuffleSplit(test_size=0.3, random_state=0)", "results": out}, indent=2))
