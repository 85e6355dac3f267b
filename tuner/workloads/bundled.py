"""Bundled torch workloads on scikit-learn's data sets; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tuner.space import Hyperparameters
from tuner.workloads.base import Classification
from tuner.workloads.datasets import split


def _tensors(name: str, image: bool = False) -> tuple[TensorDataset, TensorDataset]:
    x_train, x_val, y_train, y_val = split(name)

    def as_dataset(features: np.ndarray, targets: np.ndarray) -> TensorDataset:
        inputs = torch.from_numpy(features)
        return TensorDataset(inputs.reshape(-1, 1, 8, 8) if image else inputs, torch.from_numpy(targets))

    return as_dataset(x_train, y_train), as_dataset(x_val, y_val)


def _mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def digits_mlp() -> Classification:
    """8x8 handwritten digits, 10 classes, 1437 training images, a two-layer MLP."""
    train, val = _tensors("digits")
    return Classification(lambda hp: _mlp(64, 128, 10), train, val)


def _digits_cnn_model(hp: Hyperparameters) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def digits_cnn() -> Classification:
    """The same digits as images, a small two-convolution CNN."""
    train, val = _tensors("digits", image=True)
    return Classification(_digits_cnn_model, train, val)


def breast_cancer_mlp() -> Classification:
    """Tabular: 30 features, 2 classes, 455 training rows."""
    train, val = _tensors("breast_cancer")
    return Classification(lambda hp: _mlp(30, 64, 2), train, val)


def wine_mlp() -> Classification:
    """Tabular: 13 features, 3 classes, 142 training rows."""
    train, val = _tensors("wine")
    return Classification(lambda hp: _mlp(13, 32, 3), train, val)
