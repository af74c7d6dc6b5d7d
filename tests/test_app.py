"""Streamlit AppTest for every page, on a copy of the embedded store."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app.toy import entropy, pg_step, softmax
from conftest import ROOT

PAGES = ROOT / "app" / "pages"


@pytest.fixture
def store(tmp_path, monkeypatch):
    dst = tmp_path / "runs"
    shutil.copytree(ROOT / "data" / "store", dst)
    monkeypatch.setenv("A3PO_STORE", str(dst))
    return dst


def run_page(name, timeout=60, **state):
    at = AppTest.from_file(str(PAGES / name), default_timeout=timeout)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_main_entry_runs(store):
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=60)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Runs"


def test_empty_store_is_seeded_with_embedded_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "fresh"))
    at = run_page("runs.py")
    assert (tmp_path / "fresh" / "demo-a3po" / "run.json").exists()
    assert "demo-a3po" in at.dataframe[0].value.run_id.tolist()


def test_runs_page_overlays_selected_runs(store):
    at = run_page("runs.py")
    table = at.dataframe[0].value
    assert {"run_id", "algorithm", "status", "final_accuracy"} <= set(table.columns)
    ms = at.multiselect(key="runs_sel")
    ms.set_value(table.run_id.tolist()[:2]).run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1


def test_rollouts_page_renders_key_tokens(store):
    at = run_page("rollouts.py", run="demo-a3po")
    html = "".join(h.proto.body for h in at.get("html"))
    assert 'class="tok key"' in html and "shaped adv=" in html
    # filters and the colour quantity flow through
    at.selectbox(key="ro_quantity").set_value("entropy").run()
    assert not at.exception
    at.checkbox(key="ro_wrong").check().run()
    assert not at.exception
    shown = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert shown and all(":red[**incorrect**]" in v for v in shown)
    at.text_input(key="ro_search").input("zzzz-no-such-text").run()
    assert any("No group matches" in w.value for w in at.warning)


def test_playground_recomputes_with_engine(store):
    at = run_page("playground.py", run="demo-a3po")
    n_key = at.metric[0].value
    at.slider(key="pg_ratio").set_value(0.5).run()
    assert not at.exception
    assert int(at.metric[0].value) > int(n_key)  # a larger ratio picks more key tokens
    assert at.session_state["playground_settings"]["algorithm"]["ratio"] == 0.5
    at.selectbox(key="pg_algo").set_value("grpo").run()
    assert int(at.metric[0].value) == 0  # GRPO shapes no tokens


def test_playground_refuses_out_of_range(store):
    at = run_page("playground.py", run="demo-a3po")
    at.number_input(key="pg_w_pos").set_value(-3.0).run()
    assert any("Refused" in e.value and "w_pos" in e.value for e in at.error)


def test_launch_page_runs_a_job(store):
    at = run_page("launch.py")
    at.number_input(key="ln_steps").set_value(2)
    at.number_input(key="ln_prompts").set_value(2)
    at.number_input(key="ln_n").set_value(2)
    at.radio(key="ln_source").set_value("The demo config")
    at.text_input(key="ln_name").input("apptest-run")
    at.button(key="ln_go").click().run()
    assert not at.exception
    assert any("Queued apptest-run" in s.value for s in at.success)
    from app.launcher import get_launcher

    job = get_launcher(str(store.resolve())).wait("apptest-run", timeout=300)
    assert job.state == "finished", job.last_error()
    at.run()  # the live panel now shows the finished run
    assert any("apptest-run" in m.value and "finished" in m.value for m in at.markdown)
    runs = run_page("runs.py")
    assert "apptest-run" in runs.dataframe[0].value.run_id.tolist()


def test_launch_refuses_bad_name(store):
    at = run_page("launch.py")
    at.text_input(key="ln_name").input("../escape")
    at.button(key="ln_go").click().run()
    assert any("Refused" in e.value for e in at.error)
    assert not (store.parent / "escape").exists()


def test_polarity101_page(store):
    at = run_page("polarity101.py")
    assert len(at.get("plotly_chart")) == 2
    at.radio(key="toy_pol").set_value("incorrect (negative)").run()
    assert not at.exception


@pytest.mark.parametrize("sampled, adv, up", [
    (4, +1.0, True),   # raise a low-probability token of a correct answer -> entropy up
    (0, -1.0, True),   # push down the favourite in a wrong answer -> entropy up
    (0, +1.0, False),  # raise the favourite in a correct answer -> entropy down
    (4, -1.0, False),  # push down a rare token in a wrong answer -> entropy down
])
def test_toy_entropy_directions(sampled, adv, up):
    z = np.array([2.5, 1.0, 0.5, -0.5, -1.0])
    h0, h1 = entropy(softmax(z)), entropy(softmax(pg_step(z, sampled, adv)))
    assert (h1 > h0) == up


def test_toy_gradient_by_hand():
    # z = [0, 0]: p = [.5, .5]; sampled 0 with A = 1, lr = 1: z' = [0.5, -0.5]
    assert np.allclose(pg_step(np.zeros(2), 0, 1.0), [0.5, -0.5])


def _tiny_cfg(**train):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["train"].update({"prompts_per_step": 2, "eval_every": 0, "save_final_model": False, **train})
    cfg["rollout"]["n"] = 2
    cfg["eval"].update({"n_prompts": 4, "k": [1, 2]})
    return cfg


def test_launcher_failed_run_shows_its_error(tmp_path):
    from app.launcher import Launcher
    from engine.store import Store

    L = Launcher(Store(tmp_path))
    cfg = _tiny_cfg(steps=1)
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    L.submit(cfg, "bad-data")
    job = L.wait("bad-data", timeout=120)
    assert job.state == "failed" and "dataset file not found" in job.last_error()


def test_launcher_stop_marks_run_killed_and_queue_runs_in_order(tmp_path):
    import time

    from app.launcher import Launcher
    from engine.store import Store

    store = Store(tmp_path)
    L = Launcher(store)
    L.submit(_tiny_cfg(steps=500), "long")
    L.submit(_tiny_cfg(steps=1), "after")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "long" / "segments" / "step_000001").exists():
        time.sleep(0.1)
    assert [j.state for j in L.jobs] == ["running", "queued"]  # one at a time
    L.stop("long")
    L.wait("long", timeout=60)
    assert L.wait("after", timeout=120).state == "finished"
    meta = store.read_run("long")
    assert meta["status"] == "killed"
    assert store.query("select count(*) c from steps where run_id = 'long'")["c"][0] >= 1  # completed steps kept
