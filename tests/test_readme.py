"""The README's two workload examples, copied out and run as a user would."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import tuner

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture
def readme_package(tmp_path: Path) -> Path:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    sources = {re.match(r"# (mypackage/\w+\.py)", block).group(1): block for block in blocks if block.startswith("# mypackage/")}
    assert set(sources) == {"mypackage/mymodule.py", "mypackage/train.py"}
    (tmp_path / "mypackage").mkdir()
    (tmp_path / "mypackage" / "__init__.py").write_text("")
    for name, source in sources.items():
        (tmp_path / name).write_text(source)
    return tmp_path


@pytest.mark.parametrize("workload", ["mypackage.mymodule:blobs", "mypackage.train:train"])
def test_readme_workload_runs(readme_package, workload):
    spec = {
        "name": "readme",
        "workload": workload,
        "objective": {"metric": "val_accuracy"},
        "budget": {"n_trials": 2},
        "search": {
            "batch_size": {"low": 16, "high": 128},
            "lr": {"low": 1e-3, "high": 1e-1},
            "epochs": {"low": 1, "high": 2},
        },
    }
    (readme_package / "spec.yaml").write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{readme_package / 'r.db'}"
    result = tuner("run", "spec.yaml", "--storage", url, cwd=readme_package, env={"PYTHONPATH": str(readme_package)})
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="readme", storage=url)
    assert len(study.trials) == 2 and study.best_value > 0.5
    assert "best trial of 'readme'" in result.stdout
