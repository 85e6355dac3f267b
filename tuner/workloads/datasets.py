"""Scikit-learn's bundled data sets, standardized and split the same way every time."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

LOADERS = {
    "digits": datasets.load_digits,
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
}


@lru_cache(maxsize=None)
def split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_val, y_train, y_val)``: 80/20 stratified, features scaled on the train split."""
    features, targets = LOADERS[name](return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        features, targets, test_size=0.2, random_state=0, stratify=targets
    )
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        scaler.transform(x_val).astype(np.float32),
        y_train.astype(np.int64),
        y_val.astype(np.int64),
    )
