"""scikit-learn's MLPClassifier as a training function: one ``partial_fit`` pass per epoch."""

from __future__ import annotations

import numpy as np
from sklearn.neural_network import MLPClassifier

from tuner.space import Hyperparameters
from tuner.workloads.base import Report
from tuner.workloads.datasets import split


def sklearn_mlp(hp: Hyperparameters, report: Report) -> dict[str, float]:
    """Digits with scikit-learn's MLP; pruning works the same as for torch workloads."""
    x_train, x_val, y_train, y_val = split("digits")
    model = MLPClassifier(
        hidden_layer_sizes=(128,),
        solver="sgd" if hp.optimizer == "sgd" else "adam",
        batch_size=hp.batch_size,
        learning_rate_init=hp.lr,
        momentum=hp.momentum,
        alpha=hp.weight_decay,
        random_state=hp.seed,
    )
    classes = np.unique(y_train)
    metrics: dict[str, float] = {}
    for epoch in range(1, hp.epochs + 1):
        model.partial_fit(x_train, y_train, classes=classes)
        metrics = {"val_accuracy": float(model.score(x_val, y_val)), "train_loss": float(model.loss_)}
        report(epoch, metrics)
    return metrics


# Checked against the spec's batch range as a torch workload's training set is: scikit-learn
# clips a larger batch to the data with a warning, so every batch above it trained alike.
sklearn_mlp.train_samples = len(split("digits")[0])  # type: ignore[attr-defined]
