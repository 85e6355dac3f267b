"""``tuner probe --suggest``: the noise scale of a short run, and the ranges drawn from it."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import small_spec
from tuner.cli import app
from tuner.errors import BadInputError, TunerError
from tuner.spec import load_spec, parse_spec
from tuner.suggest import NoisePoint, NoiseProbe, probe_noise, suggest_ranges, write_suggested_spec


def _spec(**lr: object):
    spec = small_spec("s")
    spec["search"]["lr"].update(lr)
    return parse_spec(spec)


def test_the_batch_range_spans_the_noise_scale_in_powers_of_two() -> None:
    ranges = suggest_ranges(_spec(), 100.0, train_size=1437)
    assert (ranges.batch_low, ranges.batch_high, ranges.reference_batch_size) == (16, 512, 128)
    capped = suggest_ranges(_spec(), 1000.0, train_size=1437)
    assert (capped.batch_low, capped.batch_high, capped.reference_batch_size) == (128, 1024, 1024)
    tiny = suggest_ranges(_spec(), 0.5, train_size=1437)
    assert (tiny.batch_low, tiny.batch_high) == (1, 2)


def test_the_rate_range_moves_to_the_new_reference_by_the_rule() -> None:
    linear = suggest_ranges(_spec(scale_with_batch="linear", reference_batch_size=128), 512.0, train_size=5000)
    assert linear.reference_batch_size == 512 and linear.scale_with_batch == "linear"
    assert (linear.lr_low, linear.lr_high) == pytest.approx((4e-3, 12e-2))
    unscaled = suggest_ranges(_spec(), 512.0, train_size=5000)  # no rule in the spec: sqrt
    assert unscaled.scale_with_batch == "sqrt"
    assert (unscaled.lr_low, unscaled.lr_high) == pytest.approx((2e-3, 6e-2))


def test_an_unmeasured_noise_scale_suggests_nothing() -> None:
    with pytest.raises(TunerError, match="could not be measured"):
        NoiseProbe(100, "val_accuracy", [NoisePoint(1, 100, None, 0.5)]).latest


def test_a_short_run_measures_the_noise_scale_per_epoch() -> None:
    # The time first: the table shows the objective that measures quality, as tuner best --within.
    objectives = [{"metric": "train_time_s", "direction": "minimize"}, {"metric": "val_accuracy", "direction": "maximize"}]
    spec = parse_spec(small_spec("s", objective=None, objectives=objectives))
    noise = probe_noise(spec, torch.device("cpu"), epochs=2)
    assert noise.train_size == 1437 and noise.metric == "val_accuracy"
    assert [(point.epoch, point.samples) for point in noise.points] == [(1, 1437), (2, 2874)]
    assert all(point.noise_scale > 0 and 0.5 < point.metric <= 1 for point in noise.points)
    with pytest.raises(BadInputError, match="measuring the noise scale needs a torch Workload"):
        probe_noise(parse_spec(small_spec("own", workload="user_workloads:own_loop")), torch.device("cpu"))


def test_probe_suggest_writes_a_spec_with_the_ranges(write_spec, sqlite_url: str, tmp_path) -> None:
    spec = write_spec(small_spec("digits"))
    new = tmp_path / "digits-suggested.yaml"
    result = CliRunner().invoke(app, ["probe", str(spec), "--storage", sqlite_url, "--device", "cpu", "--write", str(new)])
    assert result.exit_code == 0, result.output
    assert "gradient noise scale" in result.stdout and "suggested effective batch" in result.stdout
    # No study was created there, so the probe's answer is not stored and no file is left.
    assert "not stored: no study 'digits' yet" in result.stdout
    assert not (tmp_path / "study.db").exists()
    written = load_spec(new)
    assert written.name == "digits-suggested"
    batch, lr = written.search.batch_size, written.search.lr
    assert f"suggested effective batch: {batch.low} to {batch.high}" in result.stdout
    assert f"at batch {lr.reference_batch_size}, scaled by sqrt" in result.stdout
    assert batch.high <= 1024 and written.search.epochs == load_spec(spec).search.epochs


def test_the_suggested_spec_is_written_into_a_new_folder_or_refused_naming_write(tmp_path) -> None:
    ranges = suggest_ranges(_spec(), 100.0, train_size=1437)
    new = tmp_path / "suggested" / "digits.yaml"
    write_suggested_spec(_spec(), ranges, new)
    assert load_spec(new).search.batch_size.high == ranges.batch_high
    with pytest.raises(BadInputError, match="--write .*digits.yaml.* cannot be written"):
        write_suggested_spec(_spec(), ranges, new / "digits.yaml")  # under a file
