"""The linear models of the pretrained baselines (scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


def logreg(seed: int, rarest: int, max_iter: int = 3000) -> LogisticRegressionCV | LogisticRegression:
    """Logistic regression whose regularisation strength is chosen by 3-fold cross-validation on the training
    split (a fixed C overfits a few hundred examples of 384+ features and understates the baseline); fewer folds
    where the rarest class has fewer than 3 examples (``rarest``: its count), and none where it has one (a stratified
    fold could not hold it; scikit-learn raised): C = 1 then, on standardised features."""
    folds = min(3, rarest)
    if folds < 2:
        return LogisticRegression(C=1.0, max_iter=max_iter, random_state=seed)
    return LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=folds, max_iter=max_iter, random_state=seed)


class Standardise(StandardScaler):
    """StandardScaler that reads a feature whose spread is under ``DEAD`` x the largest one as
    constant: it is scaled to 0, so the model after it gives it no weight. all-MiniLM-L6-v2's
    mean-pooled output has three such dimensions (values about 1e-32); StandardScaler divides them
    by their 1e-32 spread, and the probe, moved onto the raw features (``unscaled``), weighed them
    1e31: a head that a fine-tuned backbone, an fp16 cast or int8 quantisation turns into nonsense."""

    DEAD = 1e-6

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> Standardise:
        super().fit(X, y, sample_weight)
        if self.scale_ is not None and len(self.scale_):
            self.scale_ = np.where(self.scale_ < self.DEAD * self.scale_.max(), np.inf, self.scale_)
        return self


class Probe(Pipeline):
    """Standardise, then the linear model; fitted with BLAS on one thread. Its matrix products (a few
    thousand rows x a few hundred features) are too small to share: on 2 cores (AMD EPYC Zen 4)
    LogisticRegressionCV's 22 fits took 6.6 s on 2 BLAS threads and 0.9 s on one (1,000 rows, 3
    classes), 5.4 s -> 0.5 s (2,500 rows, 2 classes), 8.8 s -> 2.9 s (2,560 rows, 40 classes),
    26 s -> 8.7 s (10,240 rows, 40 classes), with the same C and weights. RidgeCV loses 0.1 s."""

    def fit(self, X: Any, y: Any = None, **params: Any) -> Probe:
        with threadpool_limits(1, user_api="blas"):
            return super().fit(X, y, **params)


def scaled(model: Any) -> Probe:
    return Probe([("standardise", Standardise()), ("model", model)])


def unscaled(pipeline: Any, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear model fitted after ``scaled``'s StandardScaler, as weights on the raw features:
    w.(x - mean)/scale + b = (w/scale).x + (b - (w/scale).mean)."""
    scaler = pipeline[0]
    w = np.atleast_2d(coef) / scaler.scale_
    return w, np.atleast_1d(intercept) - w @ scaler.mean_
