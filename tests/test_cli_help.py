"""The command's help as a user reads it."""

from __future__ import annotations

import re

import typer

from conftest import tuner
from tuner.cli import app


def test_every_command_is_summed_up_on_one_line():
    """A summary wrapped by hand in a docstring would come out broken mid-sentence in the list."""
    result = tuner("--help", env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    panel = result.stdout.split("Commands")[1].split("╰")[0]
    rows = [line.strip("│ ") for line in panel.splitlines()[1:]]
    names = [re.match(r"[a-z]+(?=\s{2})", row) for row in rows]
    assert all(names), [row for row, name in zip(rows, names) if not name]
    assert {"run", "worker", "best", "probe", "status"} <= {name.group() for name in names}


def test_every_option_says_what_it_is_for():
    group = typer.main.get_command(app)
    missing = [
        f"{name} {option.opts[0]}"
        for name, command in group.commands.items()
        for option in command.params
        if option.param_type_name == "option" and not option.hidden and not option.help
    ]
    assert missing == []
