"""Bad input: exit code 2, one or two plain sentences naming the cause, no traceback."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import small_spec, tuner
from tuner.spec import parse_spec
from tuner.study import create_study
from tuner.worker import WorkerOptions, run_worker


def _assert_bad_input(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_workload(write_spec, sqlite_url):
    spec = write_spec(small_spec("x", workload="resnet_on_the_moon"))
    _assert_bad_input(
        tuner("create", str(spec), "--storage", sqlite_url),
        "spec field 'workload'", "Unknown workload 'resnet_on_the_moon'", "digits_mlp",
    )


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [({}, "set lower, upper or both"), ({"lower": 0.9, "upper": 0.1}, "lower (0.9) must not be above upper (0.1)")],
)
def test_threshold_pruner_needs_sound_bounds(write_spec, sqlite_url, bounds, expected):
    spec = write_spec(small_spec("x", pruner={"name": "threshold", **bounds}))
    _assert_bad_input(tuner("create", str(spec), "--storage", sqlite_url), "spec field 'pruner.threshold'", expected)


def test_wrong_type(write_spec, sqlite_url):
    spec = small_spec("x")
    spec["search"]["epochs"]["low"] = "three"
    _assert_bad_input(tuner("create", str(write_spec(spec)), "--storage", sqlite_url), "search.epochs.low")


def test_unknown_key(write_spec, sqlite_url):
    _assert_bad_input(tuner("create", str(write_spec(small_spec("x", pruner={"name": "median", "speed": 2}))), "--storage", sqlite_url), "pruner.median.speed", "not a known field")


def test_low_above_high(write_spec, sqlite_url):
    spec = small_spec("x")
    spec["search"]["lr"] = {"low": 0.1, "high": 0.01}
    _assert_bad_input(tuner("create", str(write_spec(spec)), "--storage", sqlite_url), "search.lr", "must not be above high")


@pytest.mark.parametrize(("seed", "expected"), [(-1, "greater than or equal to 0"), (2**32, "less than 4294967296")])
def test_a_seed_outside_numpys_range_is_refused(write_spec, sqlite_url, seed, expected):
    spec = small_spec("x", sampler={"name": "tpe", "seed": seed})
    _assert_bad_input(tuner("create", str(write_spec(spec)), "--storage", sqlite_url), "spec field 'sampler.seed'", expected)


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_an_infinite_bound_is_refused_before_the_study_is_made(write_spec, tmp_path, field):
    spec = small_spec("x")
    spec["search"][field] = {"low": 1e-4, "high": float("inf")}
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _assert_bad_input(tuner("create", str(write_spec(spec)), "--storage", url), f"search.{field}.high", "finite number")
    assert not (tmp_path / "study.db").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "spec.yaml is empty"),
        (b"name: x\nworkload: [a\n", 'in "SPEC", line 2'),
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "spec.yaml is not a text file"),
        (b"- a\n- b\n", "must be a mapping of fields (key: value), not ['a', 'b']"),
        (b"name: x\nworkload: digits_mlp\nworkload: digits_cnn\n", "found the key 'workload' twice\n  in \"SPEC\", line 3"),
    ],
)
def test_a_spec_file_that_is_not_a_spec(tmp_path, sqlite_url, content, expected):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    _assert_bad_input(tuner("create", str(path), "--storage", sqlite_url), expected.replace("SPEC", str(path)))


def test_a_folder_given_as_the_spec(tmp_path, sqlite_url):
    _assert_bad_input(tuner("create", str(tmp_path), "--storage", sqlite_url), "is a folder; name a YAML file in it")


def test_a_misshapen_field_is_named_without_pydantic_words(write_spec, sqlite_url):
    spec = small_spec("x", pruner={"name": "bogus"})
    spec["search"]["batch_size"] = 32
    result = tuner("create", str(write_spec(spec)), "--storage", sqlite_url)
    _assert_bad_input(
        result,
        "spec field 'pruner.name': must be one of 'median', 'percentile'",
        "(got 'bogus')",
        "spec field 'search.batch_size': must be a mapping of fields (key: value) (got 32)",
    )
    assert "BatchSizeSpace" not in result.stderr and "tag" not in result.stderr


@pytest.mark.parametrize("pruner", [{}, {"median": {"n_startup_trials": 2}}])
def test_a_pruner_without_its_name_lists_the_names(write_spec, sqlite_url, pruner):
    result = tuner("create", str(write_spec(small_spec("x", pruner=pruner))), "--storage", sqlite_url)
    _assert_bad_input(result, "spec field 'pruner.name' is required: one of 'median', 'percentile', 'sha', 'hyperband'")
    assert "discriminator" not in result.stderr


def test_missing_spec_file(tmp_path, sqlite_url):
    _assert_bad_input(tuner("run", str(tmp_path / "nope.yaml"), "--storage", sqlite_url), "does not exist")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql://alice:s3cret@127.0.0.1:1/db", "Cannot open storage 'postgresql://alice:***@127.0.0.1:1/db'"),
        ("nonsense", "is not a URL"),
        ("mysql://bob:hunter2@127.0.0.1:1/db", "Cannot open storage"),
        # A driver splits at the first '@' and would name the password's tail as the host.
        # A one-letter password is masked where it stands alone, not inside the driver's words.
        ("postgresql://alice:p@127.0.0.1:1/db", "port 1 failed"),
        ("postgresql://alice:s3@cret@127.0.0.1:1/db", "'postgresql://alice:***@127.0.0.1:1/db' has an '@' in its user or password; write it as %40"),
        ("postgresql//alice:s3cret@127.0.0.1:1/db", "'postgresql//alice:***@127.0.0.1:1/db' is not a URL"),
        # libpq takes a password in the query too; SQLAlchemy reads a '?' before the '@' as the password's.
        ("postgresql://alice@127.0.0.1:1/db?password=s3cret", "Cannot open storage 'postgresql://alice@127.0.0.1:1/db?password=***'"),
        ("postgresql://alice:pa?s3cret@127.0.0.1:1/db", "Cannot open storage 'postgresql://alice:***@127.0.0.1:1/db'"),
        ("grpc://alice:s3cret@127.0.0.1:1", "'grpc://alice:***@127.0.0.1:1' must be grpc://HOST:PORT"),
        # redis connects at its first command, which failed with its bare ConnectionError (exit 1).
        ("redis://:s3cret@127.0.0.1:1/0", "Cannot open storage 'redis://:***@127.0.0.1:1/0': Error 111"),
        ("postgresql://alice:s3cret@127.0.0.1:5432x/db", "'postgresql://alice:***@127.0.0.1:5432x/db' is not a valid database URL"),
        # The '@host' left out: the password reads as a port that is no number.
        ("postgresql://alice:s3cret/db", "'postgresql://alice:***/db' is not a valid database URL"),
        ("postgresql://alice:s3cret127.0.0.1:5432/db", "'postgresql://alice:***/db' is not a valid database URL"),
        # A driver that is not installed: Optuna re-raises it as a bare ImportError.
        ("mysql+mysqldb://bob:hunter2@127.0.0.1:1/db", "'mysql+mysqldb://bob:***@127.0.0.1:1/db' needs the Python package 'MySQLdb'"),
    ],
)
def test_bad_storage_url_masks_password(url, expected):
    result = tuner("status", "--storage", url)
    _assert_bad_input(result, expected)
    assert "cret" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///file:x?mode=memory&uri=true"])
@pytest.mark.parametrize("command", ["create", "run"])
def test_a_database_in_memory_is_refused(write_spec, url, command):
    """Each process would open its own empty database and lose it as it exits: the workers of
    ``tuner run`` would find no study, and a study made by ``tuner create`` would be gone."""
    result = tuner(command, str(write_spec(small_spec("x"))), "--storage", url)
    _assert_bad_input(result, f"Storage {url!r} is a database in memory")


@pytest.mark.parametrize("value", ["2m", "-1", "nan"])
def test_a_database_retry_setting_that_is_not_seconds(write_spec, sqlite_url, value):
    _assert_bad_input(
        tuner("create", str(write_spec(small_spec("x"))), "--storage", sqlite_url, env={"TUNER_DB_RETRY_S": value}),
        f"TUNER_DB_RETRY_S must be a number of seconds, 0 or more, not {value!r}",
    )


@pytest.mark.parametrize(("name", "value"), [("TUNER_HEARTBEAT_INTERVAL", "10s"), ("TUNER_HEARTBEAT_GRACE", "0")])
def test_a_heartbeat_setting_that_is_not_whole_seconds(write_spec, sqlite_url, name, value):
    _assert_bad_input(
        tuner("create", str(write_spec(small_spec("x"))), "--storage", sqlite_url, env={name: value}),
        f"{name} must be a whole number of seconds above 0, not {value!r}",
    )


@pytest.mark.parametrize("grace", ["2", "4"])
def test_a_heartbeat_grace_no_longer_than_the_interval_is_refused(write_spec, sqlite_url, grace):
    """Between two beats a live worker's trial would look dead, and be failed and retried."""
    env = {"TUNER_HEARTBEAT_INTERVAL": "4", "TUNER_HEARTBEAT_GRACE": grace}
    _assert_bad_input(
        tuner("create", str(write_spec(small_spec("x"))), "--storage", sqlite_url, env=env),
        f"TUNER_HEARTBEAT_GRACE ({grace} s) must be longer than TUNER_HEARTBEAT_INTERVAL (4 s)",
    )


def test_unknown_study_names_the_storage_and_lists_the_known_ones(write_spec, sqlite_url):
    assert tuner("create", str(write_spec(small_spec("known-one"))), "--storage", sqlite_url).returncode == 0
    # The storage that TUNER_STORAGE chose unseen is named.
    _assert_bad_input(
        tuner("best", "--study", "unknown", env={"TUNER_STORAGE": sqlite_url}),
        f"No study named 'unknown' in storage {sqlite_url!r}", "known-one",
    )


@pytest.mark.parametrize("command", [("create", "SPEC"), ("status",), ("best",)])
def test_an_empty_study_name_is_refused(write_spec, tmp_path, command):
    """Read as no name, it took the spec's study, or every study, without a word."""
    args = [str(write_spec(small_spec("x"))) if arg == "SPEC" else arg for arg in command]
    _assert_bad_input(tuner(*args, "--study", " ", "--storage", f"sqlite:///{tmp_path}/s.db"), "a study name cannot be empty")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("command", [("best", "--study", "nope"), ("status",), ("worker", "--study", "nope")])
@pytest.mark.parametrize("where", ["sqlite:///{}/typo.db", "sqlite:///{}/nodir/x.db", "journal://{}/nodir/j.log"])
def test_reading_a_storage_file_that_is_not_there_creates_nothing(tmp_path, command, where):
    """A mistyped path would otherwise leave an empty database behind and answer as if no study
    had been made yet."""
    url = where.format(tmp_path)
    _assert_bad_input(tuner(*command, "--storage", url), f"{url}: no such file", "`tuner create` or `tuner run`")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [("status",), ("create", "SPEC")])
@pytest.mark.parametrize("where", ["journal://{}", "sqlite:///{}"])
def test_a_storage_file_that_is_a_folder(write_spec, tmp_path, command, where):
    url = where.format(tmp_path)
    args = [str(write_spec(small_spec("x"))) if arg == "SPEC" else arg for arg in command]
    _assert_bad_input(tuner(*args, "--storage", url), f"{url}: '{tmp_path}' is a folder; name a file in it")


def test_different_spec_under_the_same_name_shows_the_difference(write_spec, sqlite_url):
    assert tuner("create", str(write_spec(small_spec("same"))), "--storage", sqlite_url).returncode == 0
    again = tuner("create", str(write_spec(small_spec("same"))), "--storage", sqlite_url)
    assert again.returncode == 0, again.stderr
    changed = small_spec("same")
    changed["search"]["epochs"]["high"] = 9
    result = tuner("create", str(write_spec(changed)), "--storage", sqlite_url)
    _assert_bad_input(result, "exists with a different spec", "  search.epochs.high: 3 stored, 9 given")
    assert "search.epochs.low" not in result.stderr


@pytest.mark.parametrize("command", ["create", "run"])
def test_a_study_of_the_name_made_without_tuner_is_not_taken_over(write_spec, sqlite_url, command):
    foreign = optuna.create_study(study_name="taken", storage=sqlite_url, direction="minimize")
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    result = tuner(command, str(write_spec(small_spec("taken"))), "--storage", sqlite_url)
    _assert_bad_input(result, f"Study 'taken' in storage {sqlite_url!r} was not made by tuner", "use another name")
    again = optuna.load_study(study_name="taken", storage=sqlite_url)
    assert again._storage.get_study_system_attrs(again._study_id) == {} and len(again.trials) == 2


def test_an_empty_study_of_the_name_made_without_tuner_is_taken(write_spec, sqlite_url):
    optuna.create_study(study_name="empty", storage=sqlite_url, direction="maximize")
    result = tuner("create", str(write_spec(small_spec("empty"))), "--storage", sqlite_url)
    assert result.returncode == 0, result.stderr


def test_a_misspelt_metric_stops_the_run_and_the_corrected_spec_takes_the_study_over(write_spec, sqlite_url):
    """The metric is checked at the first epoch: the study is made by then, and a typo must not
    cost it its name or a trial of its budget."""
    wrong = small_spec("metric", objective={"metric": "val_acc", "direction": "maximize"}, budget={"n_trials": 1})
    result = tuner("run", str(write_spec(wrong)), "--storage", sqlite_url, "--device", "cpu")
    _assert_bad_input(
        result, "'val_acc' is not among the metrics the workload reports", "1 of 1 workers exited with an error"
    )
    (failed,) = optuna.load_study(study_name="metric", storage=sqlite_url).get_trials(states=(TrialState.FAIL,))
    assert "'val_acc' is not among the metrics" in failed.user_attrs["error"]
    corrected = tuner("run", str(write_spec(small_spec("metric", budget={"n_trials": 1}))), "--storage", sqlite_url)
    assert corrected.returncode == 0, corrected.stderr
    assert "now optimizes val_accuracy in place of val_acc" in corrected.stderr
    study = optuna.load_study(study_name="metric", storage=sqlite_url)
    (complete,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete.system_attrs["retry_history"] == [failed.number] and study.metric_names == ["val_accuracy"]


def test_a_metric_is_not_renamed_once_a_trial_has_reported_it(write_spec, sqlite_url):
    create_study(parse_spec(small_spec("reported", budget={"n_trials": 1})), sqlite_url)
    run_worker("reported", sqlite_url, WorkerOptions(threads=1, worker_index=0))
    renamed = small_spec("reported", objective={"metric": "train_loss", "direction": "minimize"}, budget={"n_trials": 1})
    result = tuner("create", str(write_spec(renamed)), "--storage", sqlite_url)
    _assert_bad_input(
        result,
        "  objective.direction: maximize stored, minimize given",
        "  objective.metric: val_accuracy stored, train_loss given",
    )
    assert "A metric is renamed only" not in result.stderr
    renamed["objective"]["direction"] = "maximize"
    result = tuner("create", str(write_spec(renamed)), "--storage", sqlite_url)
    _assert_bad_input(result, "A metric is renamed only while no trial of the study has reported or runs.")
    assert optuna.load_study(study_name="reported", storage=sqlite_url).metric_names == ["val_accuracy"]


def test_unavailable_device(write_spec, sqlite_url):
    _assert_bad_input(tuner("run", str(write_spec(small_spec("dev"))), "--device", "cuda", "--storage", sqlite_url), "CUDA is not available")


def test_a_device_type_the_loop_does_not_train_on_is_refused(write_spec, sqlite_url):
    """torch knows device types such as meta and xpu, but every trial on them failed and the
    worker exited 0 having spent the budget on failures."""
    device = "meta"
    spec = write_spec(small_spec("dev"))
    expected = f"Unknown device {device!r}; use auto, cpu, cuda, cuda:K or mps."
    _assert_bad_input(tuner("run", str(spec), "--device", device, "--storage", sqlite_url), expected)
    assert tuner("create", str(spec), "--storage", sqlite_url).returncode == 0
    _assert_bad_input(tuner("worker", "--study", "dev", "--device", device, "--storage", sqlite_url), expected)
    assert create_study(parse_spec(small_spec("dev")), sqlite_url).get_trials(states=(TrialState.FAIL,)) == []


def test_debug_shows_the_traceback(tmp_path, sqlite_url):
    result = tuner("--debug", "run", str(tmp_path / "nope.yaml"), "--storage", sqlite_url)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_a_file_that_is_not_a_journal(tmp_path):
    (tmp_path / "notes.log").write_text("name: x\n")
    _assert_bad_input(
        tuner("status", "--storage", str(tmp_path / "notes.log")),
        "notes.log is not an Optuna journal file: its first line is not a JSON record",
    )


def test_a_grpc_proxy_that_does_not_answer():
    result = tuner("status", "--storage", "grpc://127.0.0.1:9")
    _assert_bad_input(result, "Nothing answers at 'grpc://127.0.0.1:9' within 10 s; is `tuner proxy` running there?")
    assert len(result.stderr.splitlines()) == 1


def test_a_workload_module_that_fails_as_it_is_imported(tmp_path, sqlite_url):
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('boom at import')\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(small_spec("x", workload="broken_module:train")))
    _assert_bad_input(
        tuner("create", str(spec), "--storage", sqlite_url, cwd=tmp_path),
        "spec field 'workload': Workload 'broken_module:train' does not load: RuntimeError: boom at import",
    )


def test_a_workload_factory_that_fails_as_it_is_called(tmp_path, sqlite_url):
    (tmp_path / "broken_factory.py").write_text("def make():\n    raise FileNotFoundError('data/train.csv')\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(small_spec("x", workload="broken_factory:make")))
    _assert_bad_input(
        tuner("create", str(spec), "--storage", sqlite_url, cwd=tmp_path),
        "spec field 'workload': Workload 'broken_factory:make' does not load: FileNotFoundError: data/train.csv",
    )


def test_report_into_a_path_that_is_a_file(tmp_path, sqlite_url):
    study = create_study(parse_spec(small_spec("reported", budget={"n_trials": 1})), sqlite_url)
    study.tell(study.ask(), 0.5)
    (tmp_path / "taken").write_text("")
    _assert_bad_input(
        tuner("report", "--study", "reported", "--storage", sqlite_url, "--out", str(tmp_path / "taken")),
        "cannot be made a folder: File exists",
    )
