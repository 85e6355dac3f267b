"""The plain Optuna baseline, written as Optuna's own PyTorch example writes it.

As in ``optuna-examples/pytorch/pytorch_simple.py``: a fixed number of epochs, batch size and
learning rate suggested independently, Adam, the default ``TPESampler`` and a ``MedianPruner``, the
validation accuracy reported after every epoch. Only the model and the data are tuner's bundled
workload's, so that both tune the same problem.

    python benchmarks/baselines/optuna_pytorch.py [--workload digits_cnn] [--n-trials 20]
"""

from __future__ import annotations

import argparse

import optuna
import torch
from torch.utils.data import DataLoader

from tuner.space import Hyperparameters
from tuner.workloads import load_workload

EPOCHS = 10
BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024]


def make_objective(workload_name: str, seed: int = 0):
    workload = load_workload(workload_name)
    batch_sizes = [b for b in BATCH_SIZES if b <= len(workload.train_data)]
    valid_loader = DataLoader(workload.val_data, batch_size=1024)

    def objective(trial: optuna.Trial) -> float:
        batch_size = trial.suggest_categorical("batch_size", batch_sizes)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        torch.manual_seed(seed + trial.number)
        model = workload.model(Hyperparameters(batch_size=batch_size, lr=lr, base_lr=lr, epochs=EPOCHS))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        train_loader = DataLoader(workload.train_data, batch_size=batch_size, shuffle=True)

        accuracy = 0.0
        for epoch in range(EPOCHS):
            model.train()
            for data, target in train_loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(data), target)
                loss.backward()
                optimizer.step()

            model.eval()
            correct = 0
            with torch.no_grad():
                for data, target in valid_loader:
                    correct += int((model(data).argmax(dim=1) == target).sum())
            accuracy = correct / len(workload.val_data)

            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    return objective


def create_study(seed: int) -> optuna.Study:
    return optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=optuna.pruners.MedianPruner()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="digits_cnn")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study = create_study(args.seed)
    study.optimize(make_objective(args.workload, args.seed), n_trials=args.n_trials)
    print(f"best val_accuracy {study.best_value:.4f} with {study.best_params}")


if __name__ == "__main__":
    main()
