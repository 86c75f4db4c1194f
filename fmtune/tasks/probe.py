"""The linear models of the pretrained baselines (scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def logreg(seed: int, cv: int = 3, max_iter: int = 3000) -> LogisticRegressionCV:
    # The regularisation strength is chosen by 3-fold cross-validation on the training split:
    # a fixed C overfits a few hundred examples of 384+ features and understates the baseline.
    return LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=cv, max_iter=max_iter, random_state=seed)


def scaled(model: Any) -> Any:
    return make_pipeline(StandardScaler(), model)


def unscaled(pipeline: Any, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear model fitted after ``scaled``'s StandardScaler, as weights on the raw features:
    w.(x - mean)/scale + b = (w/scale).x + (b - (w/scale).mean)."""
    scaler = pipeline[0]
    w = np.atleast_2d(coef) / scaler.scale_
    return w, np.atleast_1d(intercept) - w @ scaler.mean_
