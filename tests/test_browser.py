"""End-to-end in a real headless browser: Debian's chromium driven by Playwright.

Opens the app, navigates to Rollouts and checks highlighted key tokens, moves a playground slider and
sees the key tokens change, launches a 2-step run and sees it finish. Saves a screenshot of every
page to $A3PO_SCREENSHOT_DIR (docs/ holds the ones the README shows).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-quic", "--no-first-run"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("chromium is missing: .ci/run installs Debian's chromium for this test")
    pytest.skip("Debian chromium not installed (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    store = tmp_path / "runs"
    shutil.copytree(ROOT / "data" / "store", store)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "app", "--store", str(store), "--port", str(port), "--headless"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("app did not start")
    yield url
    proc.terminate()
    proc.wait(10)


def test_app_in_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("A3PO_SCREENSHOT_DIR", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 2400})
        page.goto(app_url)
        expect(page.get_by_role("heading", name="Runs")).to_be_visible(timeout=60_000)
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(shots / "runs.png"))

        page.get_by_role("link", name="Rollouts").click()
        expect(page.get_by_role("heading", name="Rollouts")).to_be_visible(timeout=30_000)
        keys = page.locator("span.tok.key")
        expect(keys.first).to_be_visible(timeout=60_000)
        assert keys.count() > 0 and page.locator("span.tok").count() > keys.count()
        assert "shaped adv=" in keys.first.get_attribute("title")
        page.screenshot(path=str(shots / "rollouts.png"))

        page.get_by_role("link", name="Shaping playground").click()
        expect(page.get_by_role("heading", name="Shaping playground")).to_be_visible(timeout=30_000)
        expect(page.locator("span.tok").first).to_be_visible(timeout=60_000)
        metric = page.locator('[data-testid="stMetricValue"]').first
        before = int(metric.inner_text())
        slider = page.get_by_role("slider", name="Key-token ratio")
        slider.focus()
        for _ in range(4):
            page.keyboard.press("ArrowRight")
        page.wait_for_function(f"() => parseInt(document.querySelector('[data-testid=\"stMetricValue\"]').innerText) > {before}",
                               timeout=60_000)
        assert int(metric.inner_text()) > before
        page.screenshot(path=str(shots / "playground.png"))

        page.get_by_role("link", name="Launch").click()
        expect(page.get_by_role("heading", name="Launch")).to_be_visible(timeout=30_000)
        page.get_by_text("The demo config").click()
        for label, value in (("Steps", "2"), ("Group size G", "2"), ("Prompts per step", "2")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Enter")
        name = page.get_by_label("Run name", exact=True)
        name.fill("browser-run")
        name.press("Enter")
        page.get_by_role("button", name="Run with these settings").click()
        expect(page.get_by_text("browser-run — finished")).to_be_visible(timeout=240_000)
        page.screenshot(path=str(shots / "launch.png"))

        page.get_by_role("link", name="Polarity 101").click()
        expect(page.get_by_role("heading", name="One step on one token")).to_be_visible(timeout=30_000)
        expect(page.locator(".js-plotly-plot")).to_have_count(2, timeout=60_000)  # study curves and the toy
        expect(page.locator('[data-testid="stMetricValue"]').first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(shots / "polarity101.png"))
        browser.close()
