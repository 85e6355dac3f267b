"""Make the README's images from a real run: the demo study, its dashboard note in headless
Chromium, and one report plot. Run from the repository root: ``python scripts/screenshots.py``."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def tuner(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tuner", *args], cwd=ROOT)


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/demo.db"
        if tuner("run", "studies/demo.yaml", "--workers", "2", "--storage", url).wait():
            sys.exit("the demo run failed")
        if tuner("report", "--study", "demo", "--storage", url, "--out", f"{scratch}/report").wait():
            sys.exit("the report failed")
        shutil.copy(f"{scratch}/report/batch_size_lr.png", DOCS / "report-batch-size-lr.png")

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = tuner("dashboard", "--storage", url, "--port", str(port))
        try:
            wait_for(f"http://127.0.0.1:{port}/api/meta")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/dashboard/studies/1/note")
                page.get_by_text("Batch-size findings").wait_for(timeout=60_000)
                page.screenshot(path=DOCS / "dashboard-note.png", full_page=True)
                browser.close()
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    print(f"wrote {DOCS / 'dashboard-note.png'} and {DOCS / 'report-batch-size-lr.png'}")


if __name__ == "__main__":
    main()
