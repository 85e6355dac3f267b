"""Training throughput: tuner's training loop against a naive PyTorch loop.

Both train the same workload and model, from the same seed, for the same epochs, and evaluate on
the validation split after every epoch. The naive loop is the one people write first: a shuffled
``DataLoader``, forward, backward, step. tuner's loop also reports every epoch to an Optuna trial,
keeps a checkpoint of each epoch in memory, runs a warm-up/cosine schedule and uses PyTorch's
fused optimizer kernel. Throughput is
training samples per second of wall time over the whole run and, on the CPU, of the process's
CPU time too (one thread: what the loop itself costs, whatever else a shared machine runs); each
pair runs ``--repeats`` times, interleaved, and the best of each is kept, since a shared machine
only ever slows a run down.

    python benchmarks/throughput.py [--full] [--workload digits_cnn] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import optuna
import torch
from torch.utils.data import DataLoader

from tuner.space import Hyperparameters
from tuner.train import memory
from tuner.spec import Objective
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.workloads import Workload, load_workload

BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
OBJECTIVE = [Objective(metric="val_accuracy", direction="maximize")]


def naive_loop(workload: Workload, hp: Hyperparameters, device: torch.device) -> float:
    """Optuna's PyTorch example's loop: DataLoader batches, one step each, eval every epoch,
    and the optimizer as people construct it, with PyTorch's default implementation."""
    torch.manual_seed(hp.seed)
    model = workload.model(hp).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    train_loader = DataLoader(workload.train_data, batch_size=hp.batch_size, shuffle=True)
    val_loader = DataLoader(workload.val_data, batch_size=1024)
    accuracy = 0.0
    for _ in range(hp.epochs):
        model.train()
        for inputs, targets in train_loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = workload.loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, targets in val_loader:
                outputs = model(inputs.to(device))
                correct += int((outputs.argmax(dim=1) == targets.to(device)).sum())
        accuracy = correct / len(workload.val_data)  # type: ignore[arg-type]
    return accuracy


def tuner_loop(workload: Workload, hp: Hyperparameters, device: torch.device) -> float:
    trial = optuna.create_study(direction="maximize").ask()
    return train(workload, hp, Reporter(trial, OBJECTIVE), device=device)["val_accuracy"]


def _samples_per_s(loop, workload: Workload, hp: Hyperparameters, device: torch.device) -> tuple[float, float, float]:
    """Samples per second of wall time and of this process's CPU time, and the accuracy."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    accuracy = loop(workload, hp, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    samples = hp.epochs * len(workload.train_data)  # type: ignore[arg-type]
    return samples / seconds, samples / cpu_seconds, accuracy


def measure(workload: Workload, device: torch.device, epochs: int, repeats: int) -> list[dict]:
    rows = []
    for batch_size in BATCH_SIZES:
        hp = Hyperparameters(batch_size=batch_size, lr=1e-3, base_lr=1e-3, epochs=epochs, seed=0)
        runs: dict[str, list[tuple[float, float, float]]] = {"naive": [], "tuner": []}
        _samples_per_s(tuner_loop, workload, hp, device)  # warm-up: allocator, kernels
        for _ in range(repeats):
            for name, loop in (("naive", naive_loop), ("tuner", tuner_loop)):
                runs[name].append(_samples_per_s(loop, workload, hp, device))
        wall = {name: max(run[0] for run in mine) for name, mine in runs.items()}
        row = {
            "device": str(device),
            "device_name": memory.device_name(device),
            "batch_size": batch_size,
            "naive_samples_per_s": round(wall["naive"]),
            "tuner_samples_per_s": round(wall["tuner"]),
            "ratio": round(wall["tuner"] / wall["naive"], 2),
            "naive_val_accuracy": round(runs["naive"][0][2], 3),
            "tuner_val_accuracy": round(runs["tuner"][0][2], 3),
        }
        if device.type == "cpu":
            # CPU time leaves out what other tenants of a shared machine take from the run.
            cpu = {name: max(run[1] for run in mine) for name, mine in runs.items()}
            row.update(
                naive_cpu_samples_per_s=round(cpu["naive"]),
                tuner_cpu_samples_per_s=round(cpu["tuner"]),
                cpu_ratio=round(cpu["tuner"] / cpu["naive"], 2),
            )
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for device in sorted({row["device"] for row in rows}):
        mine = [row for row in rows if row["device"] == device]
        sizes = [row["batch_size"] for row in mine]
        axes.plot(sizes, [row["naive_samples_per_s"] for row in mine], marker="o", label=f"naive loop ({device})")
        axes.plot(sizes, [row["tuner_samples_per_s"] for row in mine], marker="s", label=f"tuner loop ({device})")
    axes.set(xscale="log", yscale="log", xlabel="batch size", ylabel="training samples / s", title="Training throughput")
    axes.legend()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more epochs and repeats")
    parser.add_argument("--workload", default="digits_cnn")
    parser.add_argument("--device", action="append", help="default: cpu, and cuda when present")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    epochs, repeats = (10, 5) if args.full else (4, 3)
    workload = load_workload(args.workload)
    rows = [row for device in devices for row in measure(workload, torch.device(device), epochs, repeats)]
    print(f"{'device':<8}{'batch':>7}{'naive/s':>11}{'tuner/s':>11}{'ratio':>7}{'CPU ratio':>11}{'naive acc':>11}{'tuner acc':>11}")
    for row in rows:
        print(
            f"{row['device']:<8}{row['batch_size']:>7}{row['naive_samples_per_s']:>11}{row['tuner_samples_per_s']:>11}"
            f"{row['ratio']:>7}{row.get('cpu_ratio', '-'):>11}{row['naive_val_accuracy']:>11}{row['tuner_val_accuracy']:>11}"
        )
    settings = {"workload": args.workload, "epochs": epochs, "repeats": repeats, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
