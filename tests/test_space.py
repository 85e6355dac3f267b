import math

import optuna
import pytest

from tuner.space import centre, scaled_learning_rate, suggest
from tuner.spec import LearningRateSpace, SearchSpace


def space(**lr: object) -> SearchSpace:
    return SearchSpace.model_validate(
        {
            "batch_size": {"low": 16, "high": 1024, "scale": "pow2"},
            "lr": {"low": 1e-4, "high": 1.0, **lr},
            "epochs": {"low": 2, "high": 20},
            "optimizer": {"choices": ["sgd", "adamw"]},
            "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
        }
    )


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_scaling_rule(rule, factor):
    lr_space = LearningRateSpace(low=1e-4, high=1.0, scale_with_batch=rule, reference_batch_size=128)
    assert math.isclose(scaled_learning_rate(0.01, 512, lr_space), 0.01 * factor)
    assert math.isclose(scaled_learning_rate(0.01, 128, lr_space), 0.01)


def test_suggest_records_base_and_used_rate():
    trial = optuna.trial.FixedTrial(
        {"batch_size": 512, "base_lr": 0.01, "epochs": 3, "optimizer": "sgd", "weight_decay": 1e-4}
    )
    hp = suggest(trial, space(scale_with_batch="sqrt", reference_batch_size=128), seed=7)
    assert hp.batch_size == 512 and hp.epochs == 3 and hp.optimizer == "sgd"
    assert math.isclose(hp.base_lr, 0.01) and math.isclose(hp.lr, 0.02)
    assert hp.seed == 7


def test_without_scaling_the_param_is_lr():
    trial = optuna.trial.FixedTrial({"batch_size": 64, "lr": 0.05, "epochs": 2, "optimizer": "adamw", "weight_decay": 1e-3})
    hp = suggest(trial, space(), seed=0)
    assert hp.lr == hp.base_lr == 0.05


def test_sampled_values_lie_in_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        hp = suggest(study.ask(), space(scale_with_batch="linear"), seed=0)
        assert hp.batch_size in [16, 32, 64, 128, 256, 512, 1024]
        assert 2 <= hp.epochs <= 20
        assert 1e-4 <= hp.base_lr <= 1.0
        assert math.isclose(hp.lr, hp.base_lr * hp.batch_size / 128)


def test_centre_is_the_middle_of_every_range_on_its_scale():
    params = centre(space(scale_with_batch="sqrt"))
    assert params["batch_size"] == 128  # the middle of 16, 32, ..., 1024
    assert math.isclose(params["base_lr"], 1e-2)  # geometric: the lr is searched on a log scale
    assert params["epochs"] == 6  # geometric middle of 2 and 20, epochs being log by default
    assert params["optimizer"] == "sgd"
    assert math.isclose(params["weight_decay"], 1e-4)


# The centre holds one of a trial budget's slots; a time budget has no slots, only the centre.
@pytest.mark.parametrize(("budget", "trials"), [({"n_trials": 3}, 3), ({"timeout_s": 60}, 1)])
def test_the_first_trial_of_a_study_is_the_centre(tmp_path, budget, trials):
    from conftest import small_spec
    from tuner.spec import parse_spec
    from tuner.study import create_study

    spec = parse_spec(small_spec("centred", budget=budget))
    study = create_study(spec, f"sqlite:///{tmp_path}/centred.db")
    first = study.trials[0]
    assert first.system_attrs["fixed_params"] == centre(spec.search)
    trial = study.ask()
    hp = suggest(trial, spec.search, seed=0)
    assert (hp.batch_size, hp.epochs) == (centre(spec.search)["batch_size"], centre(spec.search)["epochs"])
    assert len(study.trials) == trials


@pytest.mark.parametrize("sampler", ["tpe", "gp", "cmaes"])
def test_momentum_is_drawn_for_sgd_trials_only(caplog, sampler):
    """A momentum drawn for adamw would change nothing, yet the sampler and the dashboard's
    importances would take it for a searched value. Past the start-up trials the samplers that
    model the space jointly draw the momentum on its own, which is the space's design, not a
    warning each trial."""
    from tuner.spec import parse_spec
    from tuner.study import make_sampler
    from conftest import small_spec

    spec = small_spec("momentum")
    spec["search"]["optimizer"] = {"choices": ["sgd", "adamw"]}
    spec["search"]["momentum"] = {"low": 0.8, "high": 0.99}
    spec["sampler"] = {"name": sampler, "seed": 3, "n_startup_trials": 4}
    parsed = parse_spec(spec)
    study = optuna.create_study(sampler=make_sampler(parsed), direction="maximize")
    with caplog.at_level("WARNING", logger="optuna"):
        for _ in range(12):
            trial = study.ask()
            hp = suggest(trial, parsed.search, seed=0)
            assert ("momentum" in trial.params) == (hp.optimizer == "sgd")
            study.tell(trial, hp.lr)
    assert {trial.params["optimizer"] for trial in study.trials} == {"sgd", "adamw"}
    assert "sampled independently" not in caplog.text


def test_the_centre_has_a_momentum_only_where_its_optimizer_is_sgd():
    searched = {"momentum": {"low": 0.81, "high": 0.99}}
    sgd_first = SearchSpace.model_validate({**space().model_dump(), **searched})
    assert math.isclose(centre(sgd_first)["momentum"], 0.9)
    adamw_first = SearchSpace.model_validate({**sgd_first.model_dump(), "optimizer": {"choices": ["adamw", "sgd"]}})
    assert centre(adamw_first)["optimizer"] == "adamw" and "momentum" not in centre(adamw_first)
