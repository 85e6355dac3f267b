import re

import pytest

from conftest import small_spec
from tuner.errors import SpecError
from tuner.spec import BatchSizeSpace, load_spec, parse_spec
from tuner.study import create_study


def test_bundled_specs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("studies").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.search.batch_size.low <= spec.search.batch_size.high


def test_defaults_are_tpe_and_median():
    spec = parse_spec({k: v for k, v in small_spec("d").items() if k not in ("sampler", "pruner")})
    assert spec.sampler.name == "tpe" and spec.sampler.multivariate
    assert spec.pruner.name == "median"
    assert spec.directions == ["maximize"]


def test_pow2_choices():
    assert BatchSizeSpace(low=16, high=1024).choices() == [16, 32, 64, 128, 256, 512, 1024]
    assert BatchSizeSpace(low=20, high=100).choices() == [32, 64]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"colour": "red"}, "spec field 'colour' is not a known field"),
        ({"budget": {"n_trials": "many"}}, "spec field 'budget.n_trials'"),
        ({"budget": {}}, "set n_trials, timeout_s or both"),
        ({"sampler": {"name": "annealing"}}, "'tpe', 'random', 'gp', 'cmaes', 'nsga2' or 'qmc'"),
        (
            {"sampler": {"name": "nsga2", "n_startup_trials": 5}},
            "spec field 'sampler': n_startup_trials is for samplers tpe, gp, cmaes; 'nsga2' has no start-up trials",
        ),
        ({"pruner": {"name": "median", "patience": 3}}, "patience"),
        ({"pruner": {"name": "magic"}}, "'median', 'percentile', 'sha', 'hyperband', 'patient', 'threshold', 'none'"),
        ({"pruner": "median"}, "spec field 'pruner': must be a mapping of fields (key: value) (got 'median')"),
        (
            {"search": {**small_spec("x")["search"], "batch_size": {"low": 100, "high": 100}}},
            "spec field 'search.batch_size': no power of two lies between low (100) and high (100); "
            "widen the range, or set scale: linear (or log) to search every size in it",
        ),
        (
            {"search": {**small_spec("x")["search"], "epochs": 10}},
            "spec field 'search.epochs': must be a mapping of fields (key: value) (got 10); "
            "to search 10 alone, write {low: 10, high: 10}",
        ),
        (
            {"objective": None, "objectives": [{"metric": "val_accuracy"}, {"metric": "val_accuracy", "direction": "maximize"}]},
            "spec field 'objectives': metric 'val_accuracy' is named twice; each objective measures another metric",
        ),
        (
            {"search": {**small_spec("x")["search"], "optimizer": {"choices": ["sgd", "adamw", "sgd"]}}},
            "spec field 'search.optimizer.choices': 'sgd' is listed twice; the sampler would draw it twice as often",
        ),
        (
            {"search": {**small_spec("x")["search"], "batch_schedule": {"choices": ["ramp", "ramp"]}}},
            "spec field 'search.batch_schedule.choices': 'ramp' is listed twice",
        ),
        ({"budget": {"n_trials": True}}, "spec field 'budget': n_trials must be a number, not true"),
        (
            {"search": {**small_spec("x")["search"], "lr": {"low": 1.0e-3, "high": False}}},
            "spec field 'search.lr': high must be a number, not false",
        ),
    ],
)
def test_bad_fields_are_named(change, expected):
    with pytest.raises(SpecError) as error:
        parse_spec(small_spec("bad", **change))
    assert expected in str(error.value)


@pytest.mark.parametrize("metric", ["val_loss", "train_time_s", "val_error"])
def test_a_lowered_metric_without_a_direction_is_refused_not_maximized(metric):
    with pytest.raises(SpecError, match=rf"spec field 'objective': .*would maximize '{metric}'; write direction: minimize"):
        parse_spec(small_spec("loss", objective={"metric": metric}))
    assert parse_spec(small_spec("loss", objective={"metric": metric, "direction": "maximize"})).directions == ["maximize"]
    assert parse_spec(small_spec("acc", objective={"metric": "val_accuracy"})).directions == ["maximize"]


def test_low_above_high_names_the_field():
    spec = small_spec("bad")
    spec["search"]["epochs"] = {"low": 5, "high": 2}
    with pytest.raises(SpecError, match=r"search\.epochs.*low \(5\) must not be above high \(2\)"):
        parse_spec(spec)


def test_batch_scale_allowed_values():
    spec = small_spec("bad")
    spec["search"]["batch_size"]["scale"] = "cubic"
    with pytest.raises(SpecError, match=r"search\.batch_size\.scale.*'pow2', 'log' or 'linear'.*cubic"):
        parse_spec(spec)


def test_unknown_optimizer_is_refused():
    spec = small_spec("bad")
    spec["search"]["optimizer"] = {"choices": ["adam", "lion"]}
    with pytest.raises(SpecError, match=r"spec field 'search\.optimizer\.choices\.1': unknown optimizer; allowed: sgd, adamw, adam \(got 'lion'\)"):
        parse_spec(spec)


def test_momentum_stays_below_one():
    spec = small_spec("bad")
    spec["search"]["momentum"] = {"low": 0.5, "high": 1.5}
    with pytest.raises(SpecError, match=r"spec field 'search\.momentum\.high': Input should be less than 1 \(got 1\.5\)"):
        parse_spec(spec)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


# sklearn_mlp too: scikit-learn clips a larger batch to the data, so 2048 and 4096 trained alike.
@pytest.mark.parametrize("workload", ["digits_mlp", "sklearn_mlp"])
def test_batch_range_must_fit_the_data(sqlite_url, workload):
    spec = small_spec("too-big", workload=workload)
    spec["search"]["batch_size"] = {"low": 32, "high": 4096, "scale": "pow2"}
    with pytest.raises(SpecError, match=r"search\.batch_size\.high.*1437 training samples"):
        create_study(parse_spec(spec), sqlite_url)


def test_unknown_workload(sqlite_url):
    with pytest.raises(SpecError, match="spec field 'workload': Unknown workload 'imagenet'.*digits_cnn"):
        create_study(parse_spec(small_spec("w", workload="imagenet")), sqlite_url)
    with pytest.raises(SpecError, match="spec field 'workload': .*no 'missing'"):
        create_study(parse_spec(small_spec("w", workload="user_workloads:missing")), sqlite_url)


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [(["batch_size", 32], "hyperparameters"), ({"batch_size": 32, "schedule": "ramp"}, "hyperparameters.schedule")],
)
def test_a_fragment_section_that_is_not_a_mapping_is_named_as_such(hyperparameters, field):
    from tuner.retrain import FixedSpec
    from tuner.spec import parse_model

    fragment = {"workload": "digits_mlp", "objective": {"metric": "val_accuracy"}, "hyperparameters": hyperparameters}
    with pytest.raises(SpecError) as error:
        parse_model(FixedSpec, fragment, source="best.yaml")
    assert f"spec field '{field}': must be a mapping of fields (key: value)" in str(error.value)
    assert "instance of" not in str(error.value)


# Searched optimizers draw a momentum for sgd only, and tuner's loop gives it to SGD only; a
# training function with no searched optimizer may use hp.momentum as it likes.
@pytest.mark.parametrize(
    ("workload", "optimizer", "refused"),
    [
        ("digits_mlp", None, True),
        ("digits_mlp", {"choices": ["adamw", "adam"]}, True),
        ("digits_mlp", {"choices": ["sgd", "adamw"]}, False),
        ("user_workloads:own_loop", None, False),
        ("user_workloads:own_loop", {"choices": ["adam"]}, True),
    ],
)
def test_a_momentum_searched_without_sgd_is_refused(workload, optimizer, refused):
    from tuner.workloads import check_workload

    spec = small_spec("momentum", workload=workload)
    spec["search"]["momentum"] = {"low": 0.8, "high": 0.99}
    if optimizer is not None:
        spec["search"]["optimizer"] = optimizer
    if not refused:
        check_workload(parse_spec(spec))
        return
    with pytest.raises(SpecError, match=r"spec field 'search\.momentum': only the sgd optimizer .*search\.optimizer\.choices"):
        check_workload(parse_spec(spec))


# A trial is never pruned at its last epoch, and the longest trains search.epochs.high (10) epochs.
@pytest.mark.parametrize(
    ("pruner", "refused"),
    [
        ({"name": "median", "n_warmup_steps": 9}, "pruner.n_warmup_steps (9) leaves no epoch to prune at"),
        ({"name": "threshold", "lower": 0.5, "n_warmup_steps": 12}, "pruner.n_warmup_steps (12) leaves no epoch to prune at"),
        ({"name": "median", "n_warmup_steps": 8}, None),
        ({"name": "hyperband", "min_resource": 10}, "pruner.min_resource (10) leaves no epoch to prune at"),
        ({"name": "sha", "min_resource": 9}, None),
    ],
)
def test_a_pruner_that_could_never_prune_is_refused(pruner, refused):
    spec = small_spec("pruner", pruner=pruner)
    spec["search"]["epochs"] = {"low": 2, "high": 10}
    if refused is None:
        parse_spec(spec)
        return
    with pytest.raises(SpecError, match=rf"spec: {re.escape(refused)}.*search\.epochs\.high \(10\).*use at most"):
        parse_spec(spec)


def test_yaml_merge_keys_are_read_as_yaml_reads_them(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text(
        "name: merged\nworkload: digits_mlp\nobjective: {metric: val_accuracy}\nbudget: {n_trials: 2}\n"
        "search:\n  batch_size: &range {low: 16, high: 64}\n  lr: {low: 1.0e-3, high: 1.0e-1}\n"
        "  epochs: {<<: *range, high: 32}\n"
    )
    epochs = load_spec(path).search.epochs
    assert (epochs.low, epochs.high) == (16, 32)
