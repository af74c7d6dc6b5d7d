"""End-to-end in a real headless browser: Debian's chromium driven by Playwright.

Opens the app, navigates to Rollouts and checks highlighted key tokens, moves a playground slider and
sees the key tokens change, launches a 2-step run and sees it finish. Saves a screenshot of every
page to $A3PO_SCREENSHOT_DIR (docs/ holds the ones the README shows).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, healthy

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("chromium is missing: .ci/run installs Debian's chromium for this test")
    pytest.skip("Debian chromium not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def app_url(tmp_path):
    store = tmp_path / "runs"
    shutil.copytree(ROOT / "data" / "store", store)
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    # `a3po app` becomes the Streamlit server (exec); in a session of its own, so that killing its process
    # group also ends the training run the test launches from the page.
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "app", "--store", str(store), "--port", str(port), "--headless"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"app did not start: {(tmp_path / 'app.log').read_text()[-2000:]}")
            time.sleep(0.2)  # polling interval of the health check
        yield url
    finally:  # whatever the outcome: no server (nor a run it launched) is left behind
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group led by ``proc``; SIGKILL what is left of it after 30 s."""
    import signal

    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the server, or its zombie keeps the group alive
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)  # polling interval while the group exits


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _has_study_runs() -> bool:
    """Polarity 101 draws its curves from the quick study's runs, else the full study's."""
    from engine.store.store import Store

    runs = Store(ROOT / "data" / "store").query(
        "select run_id from runs where study in ('study-quick', 'study-full') and status = 'finished'"
    )
    return len(runs) > 0


# Streamlit reruns the script after every widget change; until the rerun ends, elements of the previous
# run stay on the page marked stale, so one label can match two widgets. Every step below waits (by
# polling) for the rerun to finish before reading or touching a widget, and retries an action that a
# rerun interrupted, with generous timeouts: the machine may be busy.
SETTLED = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return !!app && app.getAttribute('data-test-script-state') === 'notRunning'
        && !document.querySelector('[data-testid="stElementContainer"][data-stale="true"]');
}"""


def settle(page, timeout: float = 120_000) -> None:
    page.wait_for_function(SETTLED, polling=100, timeout=timeout)


def retry(action, what: str, timeout: float = 180) -> None:
    """Run ``action`` until it succeeds (a rerun can replace a widget mid-action) or ``timeout`` s pass."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except (AssertionError, Error) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {e}") from e


def by_key(page, key: str):
    """The element Streamlit renders for ``key=key`` (its container carries the class st-key-<key>)."""
    return page.locator(f".st-key-{key}")


def set_value(page, key: str, value: str) -> None:
    from playwright.sync_api import expect

    def act():
        settle(page)
        box = by_key(page, key).locator("input")
        expect(box).to_have_count(1, timeout=10_000)
        box.fill(value, timeout=10_000)
        box.press("Enter", timeout=10_000)
        settle(page)
        expect(by_key(page, key).locator("input")).to_have_value(value, timeout=10_000)

    retry(act, f"set {key!r} to {value!r}")


def open_page(page, title: str, heading: str | None = None) -> None:
    from playwright.sync_api import expect

    def act():
        settle(page)
        page.get_by_role("link", name=title).click(timeout=10_000)
        expect(page.get_by_role("heading", name=heading or title)).to_be_visible(timeout=60_000)
        settle(page)

    retry(act, f"open {title}")


def test_app_in_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("A3PO_SCREENSHOT_DIR", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2400})
            page.set_default_timeout(60_000)
            page.goto(app_url, timeout=120_000)
            expect(page.get_by_role("heading", name="Runs")).to_be_visible(timeout=120_000)
            expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=120_000)
            settle(page)
            page.screenshot(path=str(shots / "runs.png"))

            open_page(page, "Rollouts")
            keys = page.locator("span.tok.key")
            expect(keys.first).to_be_visible(timeout=120_000)
            settle(page)
            assert keys.count() > 0 and page.locator("span.tok").count() > keys.count()
            assert "shaped adv=" in keys.first.get_attribute("title")
            page.screenshot(path=str(shots / "rollouts.png"))

            open_page(page, "Shaping playground")
            expect(page.locator("span.tok").first).to_be_visible(timeout=120_000)
            settle(page)
            metric = by_key(page, "pg_key_tokens").locator('[data-testid="stMetricValue"]')
            before = int(metric.inner_text())

            def widen_ratio():
                settle(page)
                slider = by_key(page, "pg_ratio").get_by_role("slider")
                slider.focus(timeout=10_000)
                for _ in range(4):
                    page.keyboard.press("ArrowRight")
                settle(page)
                expect(metric).not_to_have_text(str(before), timeout=60_000)
                assert int(metric.inner_text()) > before

            retry(widen_ratio, "widen the key-token ratio")
            settle(page)
            assert int(metric.inner_text()) > before
            page.screenshot(path=str(shots / "playground.png"))

            open_page(page, "Launch")

            def demo_config():
                settle(page)
                by_key(page, "ln_source").get_by_text("The demo config", exact=True).click(timeout=10_000)
                expect(by_key(page, "ln_source").get_by_role("radio", name="The demo config")).to_be_checked(
                    timeout=10_000
                )
                settle(page)

            retry(demo_config, "choose the demo config")
            for key, value in (("ln_steps", "2"), ("ln_n", "2"), ("ln_prompts", "2"), ("ln_name", "browser-run")):
                set_value(page, key, value)

            job = by_key(page, "ln_job_browser-run")

            def launch():
                settle(page)
                if not job.count():  # a retry must not submit the run twice
                    by_key(page, "ln_go").get_by_role("button").click(timeout=10_000)
                expect(job.get_by_text(re.compile(r"browser-run — (queued|running|finished)")).first).to_be_visible(
                    timeout=60_000
                )

            retry(launch, "launch the run")
            done = job.get_by_text(re.compile(r"browser-run — (finished|failed)"))
            expect(done.first).to_be_visible(timeout=900_000)  # a 2-step run + evals; slow on a busy machine
            settle(page)
            assert "finished" in done.first.inner_text(), page.locator('[role="alert"]').all_inner_texts()
            page.screenshot(path=str(shots / "launch.png"))

            open_page(page, "Polarity 101", "One step on one token")
            # a study's curves (when the embedded store holds its runs) and the toy
            expect(page.locator(".js-plotly-plot")).to_have_count(2 if _has_study_runs() else 1, timeout=120_000)
            expect(by_key(page, "toy_entropy").locator('[data-testid="stMetricValue"]')).to_be_visible(timeout=60_000)
            settle(page)
            page.screenshot(path=str(shots / "polarity101.png"))
        finally:
            browser.close()
