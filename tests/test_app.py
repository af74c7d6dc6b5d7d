"""Streamlit AppTest for every page, on a copy of the embedded store."""

import shutil

import numpy as np
import pytest
from conftest import ROOT, free_port, healthy
from streamlit.testing.v1 import AppTest

from app.toy import entropy, pg_step, softmax

PAGES = ROOT / "app" / "pages"


@pytest.fixture
def launch_on(monkeypatch):
    """What `a3po app` on 127.0.0.1 tells the server: the Launch page is on."""
    monkeypatch.setenv("A3PO_ALLOW_LAUNCH", "1")
    monkeypatch.setenv("A3PO_HOST", "127.0.0.1")


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


def test_launch_page_runs_a_job(store, launch_on):
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
    # the push the trainer recorded is the one the app recomputes from the stored tokens of older runs
    from engine.shaping.replay import PUSH_COLUMNS, push_from_tokens, step_push
    from engine.store.store import Store

    rec = step_push(Store(store), ["apptest-run"])
    assert set(rec.source) == {"recorded"} and rec.step.tolist() == [1, 2]
    again = push_from_tokens(Store(store), ["apptest-run"])
    for c in PUSH_COLUMNS:
        assert np.allclose(rec[c], again[c], rtol=1e-4, atol=1e-9), c


def test_launch_refuses_bad_name(store, launch_on):
    at = run_page("launch.py")
    at.text_input(key="ln_name").input("../escape")
    at.button(key="ln_go").click().run()
    assert any("Refused" in e.value for e in at.error)
    assert not (store.parent / "escape").exists()


# ------------------------------------------------------------------ launching only where it is safe
@pytest.mark.parametrize(
    "host, allow, on",
    [
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("192.168.1.5", False, False),
        ("example.com", False, False),
        ("", False, False),
        (None, False, False),
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("localhost", False, True),
        ("[::1]", False, True),
        ("127.0.0.2", False, True),  # all of 127.0.0.0/8 is loopback
        ("0.0.0.0", True, True),
        ("example.com", True, True),  # --allow-launch
    ],
)
def test_launch_decision_by_host(host, allow, on):
    from app.access import launch_allowed

    assert launch_allowed(host, allow) is on


def test_launch_status_without_a3po_app_follows_streamlit_address(monkeypatch):
    """`streamlit run app/main.py` sets no A3PO_* variables: Streamlit's server.address decides, and
    unset (every interface) means off."""
    import app.access as access

    monkeypatch.delenv("A3PO_ALLOW_LAUNCH", raising=False)
    monkeypatch.delenv("A3PO_HOST", raising=False)
    monkeypatch.setattr(access, "_streamlit_address", lambda: None)
    assert access.launch_status() == (False, None)
    monkeypatch.setattr(access, "_streamlit_address", lambda: "127.0.0.1")
    assert access.launch_status() == (True, "127.0.0.1")
    monkeypatch.setenv("A3PO_ALLOW_LAUNCH", "0")  # an explicit decision wins
    assert access.launch_status() == (False, "127.0.0.1")


@pytest.mark.parametrize(
    "args, allow",
    [
        ([], "1"),
        (["--host", "127.0.0.1"], "1"),
        (["--host", "localhost"], "1"),
        (["--host", "0.0.0.0"], "0"),
        (["--host", "192.168.1.5"], "0"),
        (["--host", "0.0.0.0", "--allow-launch"], "1"),
    ],
)
def test_a3po_app_passes_the_launch_decision_to_the_server(tmp_path, monkeypatch, args, allow):
    """`a3po app` execs the Streamlit server with A3PO_ALLOW_LAUNCH and A3PO_HOST in its environment."""
    import os

    from engine import cli

    seen = {}

    class Exec(Exception):
        pass

    def fake_execve(path, argv, env):
        seen.update(argv=argv, env=env)
        raise Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(Exec):
        cli.main(["app", "--store", str(tmp_path / "runs"), "--headless", *args])
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    assert seen["env"]["A3PO_ALLOW_LAUNCH"] == allow
    assert seen["env"]["A3PO_HOST"] == host
    assert seen["argv"][seen["argv"].index("--server.address") + 1] == host


def test_launch_page_off_on_a_network_address(store, monkeypatch):
    monkeypatch.setenv("A3PO_ALLOW_LAUNCH", "0")
    monkeypatch.setenv("A3PO_HOST", "0.0.0.0")
    at = run_page("launch.py")
    [w] = at.warning
    assert "off" in w.value and "0.0.0.0" in w.value and "--allow-launch" in w.value and "trusted network" in w.value
    assert not at.button and not at.number_input and not at.text_input and not at.radio  # no form at all
    assert any("No launched runs" in c.value for c in at.caption)  # the (empty) job list still shows


def test_launch_page_on_at_loopback(store, launch_on):
    at = run_page("launch.py")
    assert not at.warning
    assert at.button(key="ln_go").label == "Run with these settings"
    assert at.number_input(key="ln_steps").value == 20


def test_launcher_refuses_jobs_when_launch_is_off(tmp_path, monkeypatch):
    """Defence in depth: even a caller that skips the page cannot start a job."""
    from app.access import LaunchDisabled
    from app.launcher import Launcher
    from engine.store.store import Store

    monkeypatch.setenv("A3PO_ALLOW_LAUNCH", "0")
    monkeypatch.setenv("A3PO_HOST", "0.0.0.0")
    L = Launcher(Store(tmp_path))
    with pytest.raises(LaunchDisabled, match="--allow-launch"):
        L.submit(_tiny_cfg(steps=1), "sneaky")
    assert L.jobs == [] and not (tmp_path / ".launch").exists()


# ------------------------------------------------------------------ a store holding unusable run folders
GOOD_RUNS = sorted(p.name for p in (ROOT / "data" / "store").iterdir() if (p / "run.json").exists())


def _bad_run_folders(root):
    """Two run folders the store cannot use: a value that does not fit the runs table, and corrupt JSON."""
    import json

    meta = json.loads((root / GOOD_RUNS[0] / "run.json").read_text())
    (root / "bad-range").mkdir()
    (root / "bad-range" / "run.json").write_text(json.dumps({**meta, "run_id": "bad-range", "last_step": 99999999999}))
    (root / "bad-json").mkdir()
    (root / "bad-json" / "run.json").write_text('{"run_id": "bad-json", "status": "fini')


def _listed_as_invalid(monkeypatch, run_id, error):
    """Make Store.runs_table list ``run_id`` as the store does for an unusable run.json: status 'invalid'
    with an error and every other field null (whether or not the store code already does so itself)."""
    import pyarrow as pa

    from engine.store.store import Store

    orig = Store.runs_table

    def runs_table(self):
        t = orig(self)
        if not (self.root / run_id).exists():
            return t
        rows = [r for r in t.to_pylist() if r["run_id"] != run_id]
        rows.append({**{c: None for c in t.column_names}, "run_id": run_id, "status": "invalid", "error": error})
        return pa.Table.from_pylist(rows, schema=t.schema)

    monkeypatch.setattr(Store, "runs_table", runs_table)


def _every_page_survives(bad: list[str]) -> None:
    """Each page renders with no exception; the Runs page lists every good run and names each bad one;
    no picker offers a bad run."""
    at = run_page("runs.py")
    assert sorted(at.dataframe[0].value.run_id) == GOOD_RUNS
    warned = [w.value for w in at.warning]
    for rid in bad:
        assert any(w.startswith(f"run {rid} is unreadable: ") for w in warned), warned
    assert not set(bad) & set(at.multiselect(key="runs_sel").options)
    assert len(at.get("plotly_chart")) == 1
    for page in ("rollouts.py", "playground.py"):
        at = run_page(page)
        assert at.selectbox(key="run").value in GOOD_RUNS, page
        assert not set(bad) & set(at.selectbox(key="run").options), page
    at = run_page("launch.py", ln_source="A stored run's config")
    assert sorted(at.selectbox(key="ln_src_run").options) == GOOD_RUNS
    assert not at.error
    run_page("polarity101.py")
    main = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=60)
    main.run()
    assert not main.exception and main.title[0].value == "Runs"


def test_pages_leave_out_and_name_invalid_runs(store, launch_on, monkeypatch):
    """The app's side, whatever the store code: a run listed as 'invalid' is warned about, never picked."""
    _bad_run_folders(store)
    (store / "bad-range" / "run.json").unlink()  # only bad-json on disk: the store skips or lists it
    (store / "bad-range").rmdir()
    _listed_as_invalid(monkeypatch, "bad-json", "run.json: not valid JSON (line 1 column 36)")
    _every_page_survives(["bad-json"])


def test_pages_survive_bad_run_folders_on_disk(store, launch_on):
    """The whole path: out-of-range and corrupt run.json files next to good runs."""
    from engine.store.store import Store

    _bad_run_folders(store)
    listed = Store(store).runs_table().to_pandas()
    assert set(listed[listed.status == "invalid"].run_id) == {"bad-range", "bad-json"}
    _every_page_survives(["bad-range", "bad-json"])


def test_store_read_errors_show_one_message(store, monkeypatch):
    """A StoreError while reading ends the page with st.error, not a traceback."""
    from engine.store.store import Store, StoreError

    def broken(*a, **k):
        raise StoreError("store files kept changing while reading: IO Error")

    monkeypatch.setattr(Store, "query", broken)
    at = run_page("rollouts.py")
    assert [e.value for e in at.error][0].startswith("Cannot read the store") and "kept changing" in at.error[0].value
    monkeypatch.setattr(Store, "runs_table", broken)
    at = run_page("runs.py")
    assert len(at.error) == 1 and "kept changing" in at.error[0].value and not at.dataframe


def test_polarity101_page(store):
    from engine.store.store import Store

    studied = Store(store).query(
        "select run_id from runs where study in ('study-quick', 'study-full') and status = 'finished'"
    )
    at = run_page("polarity101.py")
    # a study's curves (when the embedded store holds its runs) and the toy
    assert len(at.get("plotly_chart")) == (2 if len(studied) else 1)
    at.radio(key="toy_pol").set_value("incorrect (negative)").run()
    assert not at.exception


@pytest.mark.parametrize(
    "sampled, adv, up",
    [
        (4, +1.0, True),  # raise a low-probability token of a correct answer -> entropy up
        (0, -1.0, True),  # push down the favourite in a wrong answer -> entropy up
        (0, +1.0, False),  # raise the favourite in a correct answer -> entropy down
        (4, -1.0, False),  # push down a rare token in a wrong answer -> entropy down
    ],
)
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


def test_launcher_failed_run_shows_its_error(tmp_path, launch_on):
    from app.launcher import Launcher
    from engine.store.store import Store

    L = Launcher(Store(tmp_path))
    cfg = _tiny_cfg(steps=1)
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    L.submit(cfg, "bad-data")
    job = L.wait("bad-data", timeout=120)
    assert job.state == "failed" and "dataset file not found" in job.last_error()


def test_launcher_stop_marks_run_killed_and_queue_runs_in_order(tmp_path, launch_on):
    import time

    from app.launcher import Launcher
    from engine.store.store import Store

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


# ------------------------------------------------------------------ gradient push, default task (fixture runs)
# One group of two rollouts at each of steps 1 and 2: #0 correct, #1 wrong, two tokens each:
# (rollout, position, p, raw adv, shaped adv).
FX_TOKENS = [(0, 0, 0.5, 1.0, 2.0), (0, 1, 0.9, 1.0, 1.0), (1, 0, 0.99, -1.0, -3.0), (1, 1, 0.2, -1.0, -1.0)]
# Σ|shaped − raw|·(1 − p) and Σ|raw|·(1 − p) by polarity, by hand:
FX_PUSH = {
    "push_rule_pos": 1.0 * 0.5,
    "push_rule_neg": 2.0 * 0.01,
    "push_raw_pos": 0.5 + 0.1,
    "push_raw_neg": 0.01 + 0.8,
}
FX_SAMPLER_GAP = [0.01, 0.0, -0.02, 0.0]  # trainer log-prob − sampler log-prob, per FX_TOKENS row
FX_MISMATCH = {"mismatch_abs": [0.0075, 0.0075], "mismatch_kl": [4e-5, 5e-5]}
FX_RECORDED = {
    "push_rule_pos": [3.0, 4.0],
    "push_rule_neg": [1e-5, 2e-5],
    "push_raw_pos": [10.0, 20.0],
    "push_raw_neg": [30.0, 40.0],
}


def _fx_config(task: str) -> dict:
    import dataclasses

    from engine.config import load_config

    cfg = dataclasses.asdict(load_config(ROOT / "configs" / "demo.yaml"))
    cfg["data"]["train"] = cfg["data"]["test"] = task
    cfg["train"]["steps"] = 2
    return cfg


def _fx_run(s, name: str, task: str, *, tokens: bool, recorded: bool, mismatch: dict = FX_MISMATCH) -> None:
    import pyarrow as pa

    from engine.store.schema import SCHEMAS

    rid = s.create_run(_fx_config(task), name=name)
    for step in (1, 2):
        cols = {
            "run_id": [rid] * 2,
            "step": [step] * 2,
            "rollout_idx": [0, 1],
            "group_idx": [0, 0],
            "prompt_idx": [7, 7],
            "prompt": ["3 4 5 -> 17"] * 2,
            "response": ["3*4=12(5 12);12+5=17", "3+4=7(5 7);7*5=35"],
            "answer": ["17"] * 2,
            "reward": [1.0, 0.0],
            "correct": [True, False],
            "polarity": [1, -1],
            "length": [2, 2],
            "truncated": [False, False],
            "adv_raw": [1.0, -1.0],
            "mean_logprob": [-0.4, -0.8],
            "mean_entropy": [0.5, 0.6],
            "n_key": [1, 1],
        }
        tables = {"rollouts": pa.table(cols, schema=SCHEMAS["rollouts"])}
        m = {
            "run_id": [rid],
            "step": [step],
            "reward": [0.5],
            "acc": [0.5],
            "entropy": [0.55],
            "length": [2.0],
            "clipfrac": [0.1 * step],
            "clipfrac_lower": [0.0],
        }
        if recorded:
            m.update({k: [v[step - 1]] for k, v in FX_RECORDED.items()})
            m.update({k: [v[step - 1]] for k, v in mismatch.items()})
        tables["steps"] = pa.table(m)
        if tokens:
            # fx-recorded's sampler gave each token FX_SAMPLER_GAP less log-prob than the trainer; the other
            # runs are from before the column existed (their files have none)
            cols = {
                "rollout_logprob": [float(np.log(t[2])) - g for t, g in zip(FX_TOKENS, FX_SAMPLER_GAP)],
            }
            tok_schema = (
                SCHEMAS["tokens"] if recorded else pa.schema([f for f in SCHEMAS["tokens"] if f.name not in cols])
            )
            tables["tokens"] = pa.table(
                {
                    **(cols if recorded else {}),
                    "run_id": [rid] * 4,
                    "step": [step] * 4,
                    "rollout_idx": [t[0] for t in FX_TOKENS],
                    "position": [t[1] for t in FX_TOKENS],
                    "token_id": [5, 6, 7, 8],
                    "token_text": ["3", "*", "3", "+"],
                    "logprob": [float(np.log(t[2])) for t in FX_TOKENS],
                    "entropy": [0.7, 0.1, 0.05, 1.2],
                    "adv_raw": [t[3] for t in FX_TOKENS],
                    "adv_shaped": [t[4] for t in FX_TOKENS],
                    "is_key": [t[3] != t[4] for t in FX_TOKENS],
                    "polarity": [1, 1, -1, -1],
                },
                schema=tok_schema,
            )
        s.write_step(rid, step, tables)
    s.update_run(rid, status="finished", last_step=2)


@pytest.fixture
def fx_store(tmp_path, monkeypatch):
    """fx-default: the default task, tokens only (an older run: push recomputed from tokens);
    fx-recorded: arith, push columns recorded; fx-none: arith, neither (the newest run)."""
    from app.common import default_task
    from engine.store.store import Store

    root = tmp_path / "fx"
    s = Store(root)
    _fx_run(s, "fx-default", default_task(), tokens=True, recorded=False)
    _fx_run(s, "fx-recorded", "builtin:arith", tokens=True, recorded=True)
    _fx_run(s, "fx-none", "builtin:arith", tokens=False, recorded=False)
    monkeypatch.setenv("A3PO_STORE", str(root))
    return s


def test_step_push_recorded_or_recomputed_from_tokens(fx_store):
    from engine.shaping.replay import PUSH_COLUMNS, batch_push, load_step, step_push

    push = step_push(fx_store, ["fx-default", "fx-recorded", "fx-none"])
    d = push[push.run_id == "fx-default"]
    assert d.step.tolist() == [1, 2] and set(d.source) == {"from tokens"}
    for c in PUSH_COLUMNS:
        assert np.allclose(d[c], FX_PUSH[c], rtol=1e-4), c
    r = push[push.run_id == "fx-recorded"]
    assert set(r.source) == {"recorded"}
    for c in PUSH_COLUMNS:
        assert np.allclose(r[c], FX_RECORDED[c]), c
    assert "fx-none" not in set(push.run_id)
    # the playground's helper (engine.shaping.advantage.gradient_push on the rebuilt tensors) agrees
    bp = batch_push(load_step(fx_store, "fx-default", 1))
    assert bp["rule"]["positive"] == pytest.approx(FX_PUSH["push_rule_pos"], rel=1e-4)
    assert bp["rule"]["negative"] == pytest.approx(FX_PUSH["push_rule_neg"], rel=1e-4)
    assert bp["raw"]["positive"] == pytest.approx(FX_PUSH["push_raw_pos"], rel=1e-4)
    assert bp["raw"]["negative"] == pytest.approx(FX_PUSH["push_raw_neg"], rel=1e-4)


def _fig(at, i=0):
    """The i-th Plotly figure as JSON, typed arrays ({"dtype", "bdata"}) decoded to lists."""
    import base64
    import json

    def dec(o):
        if isinstance(o, dict):
            if "bdata" in o and "dtype" in o:
                return np.frombuffer(base64.b64decode(o["bdata"]), dtype=o["dtype"]).tolist()
            return {k: dec(v) for k, v in o.items()}
        return [dec(v) for v in o] if isinstance(o, list) else o

    return dec(json.loads(at.get("plotly_chart")[i].proto.spec))


def test_runs_page_plots_push_by_rule_and_clipfrac(fx_store):
    at = run_page("runs.py", runs_sel=["fx-default", "fx-recorded", "fx-none"])
    traces = {t["name"]: t for t in _fig(at)["data"]}
    t = traces["fx-default: push rule, positive"]
    assert np.allclose(t["y"], [FX_PUSH["push_rule_pos"]] * 2, rtol=1e-4) and list(t["x"]) == [1, 2]
    assert np.allclose(traces["fx-default: push rule, negative"]["y"], [FX_PUSH["push_rule_neg"]] * 2, rtol=1e-4)
    assert np.allclose(traces["fx-recorded: push rule, negative"]["y"], FX_RECORDED["push_rule_neg"])
    assert np.allclose(traces["fx-recorded: push raw adv, positive"]["y"], FX_RECORDED["push_raw_pos"])
    assert not any(n.startswith("fx-none: push") for n in traces)
    assert np.allclose(traces["fx-recorded: clipfrac"]["y"], [0.1, 0.2])
    push_axis = traces["fx-default: push rule, positive"]["yaxis"].replace("y", "yaxis")
    assert _fig(at)["layout"][push_axis]["type"] == "log"
    table = at.dataframe[1].value.set_index("run_id")
    assert table.loc["fx-none", "source"] == "not recorded for this run"
    assert table.loc["fx-default", "source"] == "from tokens"
    assert table.loc["fx-default", "rule, positive"] == pytest.approx(FX_PUSH["push_rule_pos"], rel=1e-4)
    assert table.loc["fx-recorded", "rule, negative"] == pytest.approx(np.mean(FX_RECORDED["push_rule_neg"]))
    assert table.loc["fx-recorded", "negative / positive rule"] == pytest.approx(1.5e-5 / 3.5)
    assert any("fx-default" in c.value and "Recomputed" in c.value for c in at.caption)


def test_pages_open_on_the_default_task_run(fx_store):
    # fx-none and fx-recorded are newer, but fx-default is on the default task
    at = run_page("runs.py")
    assert at.multiselect(key="runs_sel").value == ["fx-default"]
    assert "task" in at.dataframe[0].value.columns
    for page in ("rollouts.py", "playground.py"):
        assert run_page(page).selectbox(key="run").value == "fx-default", page


def test_rollouts_colour_by_gradient_push(fx_store):
    at = run_page("rollouts.py", run="fx-default")
    at.selectbox(key="ro_quantity").set_value("gradient push").run()
    assert not at.exception
    html = "".join(h.proto.body for h in at.get("html"))
    assert "push=1.00e+00" in html  # |2.0| · (1 − 0.5) on the correct response's first token
    assert "push=3.00e-02" in html  # |−3.0| · (1 − 0.99) on the wrong response's first token
    assert any("gradient push" in c.value and "1 − p" in c.value for c in at.caption)
    at.selectbox(key="ro_hist_q").set_value("gradient push").run()
    assert not at.exception


def test_playground_shows_push_of_replayed_and_run_rule(fx_store):
    from engine.config import config_from_dict
    from engine.shaping.algorithms import resolve
    from engine.shaping.replay import batch_push, load_step, replay

    at = run_page("playground.py", run="fx-default", pg_step=1)
    tab = at.dataframe[1].value
    assert tab.loc["run's rule", "positive"] == pytest.approx(FX_PUSH["push_rule_pos"], rel=1e-4)
    assert tab.loc["run's rule", "negative"] == pytest.approx(FX_PUSH["push_rule_neg"], rel=1e-4)
    assert tab.loc["raw advantage (scale)", "negative"] == pytest.approx(FX_PUSH["push_raw_neg"], rel=1e-4)
    # "this rule" is engine.shaping.advantage.gradient_push on the engine's own replay of the page's settings
    cfg = config_from_dict(
        {
            **_fx_config("builtin:arith"),
            "algorithm": {
                **_fx_config("builtin:arith")["algorithm"],
                **at.session_state["playground_settings"]["algorithm"],
            },
        }
    )
    batch = load_step(fx_store, "fx-default", 1)
    want = batch_push(batch, replay(batch, resolve(cfg), step=0))["rule"]
    assert tab.loc["this rule", "positive"] == pytest.approx(want["positive"])
    assert tab.loc["this rule", "negative"] == pytest.approx(want["negative"])
    assert len(at.get("plotly_chart")) == 3
    at.selectbox(key="pg_algo").set_value("grpo").run()  # GRPO shapes nothing: its rule pushes nothing
    tab = at.dataframe[1].value
    assert tab.loc["this rule"].tolist() == [0.0, 0.0]
    assert tab.loc["run's rule", "positive"] == pytest.approx(FX_PUSH["push_rule_pos"], rel=1e-4)
    assert [m.value for m in at.metric if m.label.startswith("Push")] == ["0.00e+00", "0.00e+00"]


def _fx_study_run(s, rid: str, task: str, entropy: float) -> None:
    import pyarrow as pa

    s.create_run(_fx_config(task), name=rid, study=rid.split(".")[0])
    for step in (1, 2):
        s.write_step(
            rid,
            step,
            {
                "steps": pa.table(
                    {
                        "run_id": [rid],
                        "step": [step],
                        "reward": [0.5],
                        "acc": [0.5],
                        "entropy": [entropy * step],
                        "length": [30.0],
                    }
                ),
                "evals": pa.table(
                    {
                        "run_id": [rid] * 3,
                        "step": pa.array([step] * 3, pa.int32()),
                        "metric": ["sampled_acc", "pass@k", "pass@k"],
                        "k": pa.array([None, 1, 4], pa.int32()),
                        "value": [0.3, 0.3, 0.6],
                        "n": pa.array([8] * 3, pa.int32()),
                    }
                ),
            },
        )
    s.update_run(rid, status="finished", last_step=2)


def test_polarity101_prefers_the_default_task_study(tmp_path, monkeypatch):
    from app.common import default_task, task_label
    from engine.store.store import Store

    s = Store(tmp_path / "study")
    _fx_study_run(s, "study-quick.grpo.s1", default_task(), 0.2)
    _fx_study_run(s, "study-quick.nsr.s1", default_task(), 0.3)
    _fx_study_run(s, "study-quick.grpo.s0", "builtin:arith", 0.05)  # newer, but not the default task
    _fx_study_run(s, "study-quick.psr.s0", "builtin:arith", 0.04)
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "study"))
    at = run_page("polarity101.py")
    assert len(at.get("plotly_chart")) == 2
    traces = [t for t in _fig(at)["data"] if t.get("name")]
    assert {t["name"] for t in traces} == {"GRPO (both)", "NSR only (negative)"}
    grpo = next(t for t in traces if t["name"] == "GRPO (both)")
    assert np.allclose(grpo["y"], [0.2, 0.3])  # 5-step moving average of entropy 0.2, 0.4
    assert any(f"Task: `{task_label(default_task())}`" in m.value for m in at.markdown)
    assert not any("arithmetic" in m.value for m in at.markdown)


def test_polarity101_falls_back_to_the_full_study(tmp_path, monkeypatch):
    from app.common import default_task
    from engine.store.store import Store

    s = Store(tmp_path / "full")
    _fx_study_run(s, "study-full.grpo.s1", default_task(), 0.2)
    _fx_study_run(s, "study-full.grpo.s0", default_task(), 0.1)  # the lowest seed is shown
    _fx_study_run(s, "study-full.psr.s0", default_task(), 0.3)
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "full"))
    at = run_page("polarity101.py")
    assert not at.exception and len(at.get("plotly_chart")) == 2
    grpo = next(t for t in _fig(at)["data"] if t.get("name") == "GRPO (both)")
    assert np.allclose(grpo["y"], [0.1, 0.15])
    assert any("study-full" in m.value for m in at.markdown)


# ------------------------------------------------------------------ `a3po app` as a service
def _serving(port: int) -> bool:
    return healthy(f"http://127.0.0.1:{port}")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _poll(cond, timeout: float, what: str) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_app_serves_without_terminal_and_stops_with_its_server(tmp_path, sig):
    """`a3po app < /dev/null` serves (no e-mail prompt even on a first run: fresh HOME), and the
    signal that stops `a3po app` leaves no Streamlit server behind."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    log = open(tmp_path / "app.log", "w")
    env = dict(os.environ, HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "app", "--store", str(tmp_path / "runs"), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _poll(lambda: _serving(port) or proc.poll() is not None, 180, "the app's health endpoint")
        assert proc.poll() is None, (tmp_path / "app.log").read_text()
        assert _serving(port)
        proc.send_signal(getattr(signal, sig))
        proc.wait(60)
        _poll(lambda: not _port_open(port), 60, "the port to be free")
        assert "email" not in (tmp_path / "app.log").read_text().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_app_refuses_a_bad_port_in_one_line():
    from conftest import a3po

    p = a3po("app", "--port", "99999", check=False, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("a3po: error: --port")


def test_rollouts_colour_by_sampler_mismatch_or_say_not_measured(fx_store):
    at = run_page("rollouts.py", run="fx-recorded")
    at.selectbox(key="ro_quantity").set_value("sampler mismatch").run()
    assert not at.exception
    html = "".join(h.proto.body for h in at.get("html"))
    assert "Δlog p (trainer − sampler)=+1.00e-02" in html and "Δlog p (trainer − sampler)=-2.00e-02" in html
    # the two tokens whose log-probs agree exactly are left uncoloured, not pale green
    assert html.count("background:transparent") == 2 and "Δlog p (trainer − sampler)=+0.00e+00" in html
    assert any("Largest |Δ log-prob| shown: 2.00e-02" in c.value for c in at.caption)
    assert not any("not measured" in i.value for i in at.info)
    at.selectbox(key="ro_hist_q").set_value("sampler mismatch").run()
    assert not at.exception
    # a run written before the column: the same choices say "not measured" instead of failing
    old = run_page("rollouts.py", run="fx-default")
    old.selectbox(key="ro_quantity").set_value("sampler mismatch").run()
    assert not old.exception
    assert any("Mismatch not measured for this run" in i.value for i in old.info)
    assert "Δlog p" not in "".join(h.proto.body for h in old.get("html"))
    old.selectbox(key="ro_hist_q").set_value("sampler mismatch").run()
    assert not old.exception


def test_runs_page_plots_the_mismatch_where_measured(fx_store):
    at = run_page("runs.py", runs_sel=["fx-default", "fx-recorded"])
    traces = {t["name"]: t for t in _fig(at)["data"]}
    assert np.allclose(traces["fx-recorded: mean |Δ log-prob|"]["y"], FX_MISMATCH["mismatch_abs"])
    assert np.allclose(traces["fx-recorded: k3 KL"]["y"], FX_MISMATCH["mismatch_kl"])
    assert not any(n.startswith("fx-default: mean |Δ") for n in traces)
    axis = traces["fx-recorded: k3 KL"]["yaxis"].replace("y", "yaxis")
    assert _fig(at)["layout"][axis]["type"] == "log"
    assert any("Not measured (no sampler log-probs stored): fx-default" in m.value for m in at.markdown)


def test_runs_page_says_when_the_mismatch_is_exactly_zero(fx_store):
    """kv's recorded log-probs serving as the old policy: measured, 0 at every step, nothing on the log axis."""
    _fx_run(fx_store, "fx-zero", "builtin:arith", tokens=False, recorded=True, mismatch={"mismatch_abs": [0.0, 0.0]})
    at = run_page("runs.py", runs_sel=["fx-zero", "fx-recorded"])
    assert not any(n.startswith("fx-zero: mean |Δ") for n in (t["name"] for t in _fig(at)["data"]))
    text = " ".join(m.value for m in at.markdown)
    assert "Exactly 0 at every step, so nothing to draw: fx-zero." in text and "Not measured" not in text
