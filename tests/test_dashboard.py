"""``tuner dashboard`` as a real server: its JSON API on every storage kind, and the pages in
headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REQUIRE_SERVICES, TESTS, small_spec, start_tuner, tuner
from tuner.spec import parse_spec
from tuner.study import create_study

SCREENSHOTS = TESTS.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _serve(url: str) -> Iterator[str]:
    """Run ``tuner dashboard`` until the test is done, then stop it with Ctrl-C (SIGINT)."""
    port = _free_port()
    server = start_tuner("dashboard", "--storage", url, "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            _get(f"{base}/api/meta")
            break
        except OSError:
            assert time.monotonic() < deadline, "the dashboard did not answer within 90 s"
            time.sleep(0.5)
    yield base
    server.send_signal(signal.SIGINT)
    output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output
    assert f"http://127.0.0.1:{port}/dashboard/" in output
    assert "Traceback" not in output


@pytest.fixture
def dashboard(finished_study: dict) -> Iterator[str]:
    yield from _serve(finished_study["url"])


def _study_id(base: str, name: str) -> int:
    studies = _get(f"{base}/api/studies")["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def test_api_lists_the_study_and_its_trials(dashboard: str, finished_study: dict):
    detail = _get(f"{dashboard}/api/studies/{_study_id(dashboard, 'watched')}")
    assert detail["name"] == "watched"
    assert len(detail["trials"]) == 5
    assert all(any(p["name"] == "batch_size" for p in t["params"]) for t in detail["trials"])


@pytest.mark.parametrize("kind", ["journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_api_on_other_storages(kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    url = str(tmp_path / "study.log") if kind == "journal" else request.getfixturevalue("postgres_url")
    create_study(parse_spec(small_spec(f"on-{kind}", budget={"n_trials": 3})), url)
    for base in _serve(url):
        detail = _get(f"{base}/api/studies/{_study_id(base, f'on-{kind}')}")
        assert len(detail["trials"]) == 3  # the budget's waiting slots


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("nosuchhost.invalid", None),  # the resolver's words vary: not known, or a failed lookup
        ("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1: never this machine's
        ("::1", "Address family for hostname not supported"),
    ],
)
def test_a_host_it_cannot_serve_on_is_bad_input(sqlite_url: str, host: str, reason: str | None):
    """It exited 1 with the socket's error alone (``gaierror: [Errno -2] ...``), naming neither
    the host nor what to give instead."""
    create_study(parse_spec(small_spec("hosts")), sqlite_url)
    port = str(_free_port())
    result = tuner("dashboard", "--storage", sqlite_url, "--host", host, "--port", port)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: Cannot serve on {host}:{port}: {reason or ''}"), result.stderr
    assert "--host takes an IPv4 address or name of this machine, such as 127.0.0.1 or 0.0.0.0." in result.stderr


def test_an_artifact_folder_it_cannot_make_is_bad_input(sqlite_url: str, tmp_path: Path):
    """It exited 1 with the OS error alone (``FileExistsError: [Errno 17] File exists``)."""
    create_study(parse_spec(small_spec("folders")), sqlite_url)
    taken = tmp_path / "curves"
    taken.write_text("a file of the folder's name")
    result = tuner("dashboard", "--storage", sqlite_url, "--artifact-dir", str(taken), "--port", str(_free_port()))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: Cannot use {str(taken)!r} as the artifact folder: File exists; give another with --artifact-dir.\n"
    )


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; TUNER_REQUIRE_SERVICES=1 requires it")
        pytest.skip(message)
    return path


@pytest.mark.browser
def test_pages_show_study_params_and_note(dashboard: str, finished_study: dict):
    from playwright.sync_api import sync_playwright

    study_id = _study_id(dashboard, "watched")
    first = _get(f"{dashboard}/api/studies/{study_id}")["trials"][0]
    batch_size = next(p["param_external_value"] for p in first["params"] if p["name"] == "batch_size")
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{dashboard}/dashboard/studies/{study_id}/note")
        page.get_by_text("Batch-size findings").wait_for(timeout=60_000)
        page.screenshot(path=SCREENSHOTS / "dashboard-note.png", full_page=True)
        assert "Joint search of batch size, learning rate and epochs" in page.inner_text("body")

        page.goto(f"{dashboard}/dashboard/studies/{study_id}/trials")
        page.get_by_text("batch_size").first.wait_for(timeout=60_000)
        page.screenshot(path=SCREENSHOTS / "dashboard-trials.png", full_page=True)
        body = page.inner_text("body")
        assert "watched" in body
        assert re.search(rf"batch_size\s+{batch_size}\b", body)
        assert "trial-0-curve.png" in body  # the learning curve artifact, listed on the trial
        browser.close()
    assert (SCREENSHOTS / "dashboard-note.png").stat().st_size > 10_000
