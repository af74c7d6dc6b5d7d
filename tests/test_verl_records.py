"""The verl integration's verl-free half (engine.integrations.verl_records), in the main environment.

The a3po.* keys go through the engine's own config checks; a verl step given as plain tensors becomes
store rows the app and the replay read like any trainer run."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from engine.config import ConfigError, config_from_dict, resolved_from_dict
from engine.integrations import verl_records as vr
from engine.shaping.advantage import decay_alpha
from engine.shaping.algorithms import ResolvedAlgorithm, resolve, shape_tokens
from engine.shaping.replay import load_step
from engine.store.store import Store, StoreError

VERL = {
    "model_path": "Qwen/Qwen2.5-0.5B",
    "n": 4,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_response_length": 8,
    "max_prompt_length": 16,
    "train_batch_size": 2,
    "total_training_steps": 10,
    "lr": 1e-6,
    "ppo_epochs": 1,
    "seed": 1,
    "train_file": "/data/train.parquet",
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.28,
    "clip_ratio_c": 3.0,
    "loss_agg_mode": "token-mean",
}


def _cfg(*args, verl=None):
    return vr.engine_config(vr.parse_a3po_args(list(args)), {**VERL, **(verl or {})})


# ---------------------------------------------------------------- the a3po.* keys
def test_split_keeps_verl_overrides_apart():
    ours, theirs = vr.split_args(["a3po.store=runs", "data.train_batch_size=2", "+a3po.x=1", "trainer.nnodes=1"])
    assert ours == ["a3po.store=runs", "+a3po.x=1"]
    assert theirs == ["data.train_batch_size=2", "trainer.nnodes=1"]


def test_parse_collects_own_keys_and_engine_overrides():
    a = vr.parse_a3po_args(["a3po.store=runs", "a3po.run_name=x", "a3po.algorithm.alpha_pos=3"])
    assert (a.store, a.run_name, a.run_id, a.config) == ("runs", "x", None, None)
    assert a.overrides == ("algorithm.alpha_pos=3",)


@pytest.mark.parametrize(
    "arg, words",
    [
        ("a3po.alpha_pos=2", "unknown key a3po.alpha_pos"),
        ("a3po.store", "not a3po.key=value"),
        ("+a3po.store=x", "not a3po.key=value"),
        ("a3po.store=", "a3po.store is empty"),
    ],
)
def test_malformed_a3po_keys_are_one_line(arg, words):
    with pytest.raises(ConfigError) as e:
        vr.parse_a3po_args([arg])
    msg = str(e.value)
    assert words in msg and " — " in msg and "\n" not in msg


def test_bad_coefficient_is_the_engines_error():
    with pytest.raises(ConfigError, match=r"algorithm\.ratio") as e:
        _cfg("a3po.algorithm.ratio=1.5")
    assert "\n" not in str(e.value)


def test_config_file_and_keys_then_verl_values_win(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("algorithm: {name: a3po, alpha_pos: 3.0}\nmodel: {path: builtin:tiny}\nrollout: {n: 8}\n")
    cfg = _cfg(f"a3po.config={f}", "a3po.algorithm.alpha_neg=1.5", "a3po.run_name=qwen")
    assert cfg["algorithm"]["alpha_pos"] == 3.0 and cfg["algorithm"]["alpha_neg"] == 1.5
    assert cfg["model"]["path"] == "Qwen/Qwen2.5-0.5B" and cfg["rollout"]["n"] == 4  # verl's, not the file's
    assert cfg["train"]["steps"] == 10 and cfg["name"] == "qwen"
    assert cfg["actor"]["clip_ratio_high"] == 0.28
    config_from_dict(cfg)  # the app rebuilds it like this


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        _cfg(f"a3po.config={tmp_path / 'nope.yaml'}")


def test_decay_without_horizon_is_refused_and_decay_steps_fixes_it():
    with pytest.raises(ConfigError, match="total_training_steps"):
        _cfg(verl={"total_training_steps": None})
    cfg = _cfg("a3po.algorithm.decay_steps=50", verl={"total_training_steps": None})
    assert resolve(config_from_dict(cfg)).decay_steps == 50


@pytest.mark.parametrize("name", ["dapo", "w_reinforce", "fork_tokens"])
def test_algorithms_verl_cannot_shape_are_refused(name):
    with pytest.raises(ConfigError) as e:
        _cfg(f"a3po.algorithm.name={name}")
    assert " — " in str(e.value)


def test_entropy_token_rule_is_refused():
    rule = '[{"polarity": "positive", "metric": "entropy", "end": "high", "ratio": 0.2, "scale": 2}]'
    with pytest.raises(ConfigError, match="no token entropies"):
        _cfg("a3po.algorithm.name=token_weighted", f"a3po.algorithm.token_rules={rule}")


# ---------------------------------------------------------------- shipping to the workers
def test_resolved_round_trips_through_the_env_string():
    r = resolve(config_from_dict(_cfg("a3po.algorithm.alpha_pos=3")))
    env = {vr.RESOLVED_ENV: vr.resolved_env(r)}
    assert isinstance(env[vr.RESOLVED_ENV], str)
    assert vr.resolved_from_env(env) == r


def test_worker_rechecks_the_shipped_values():
    d = resolve(config_from_dict(_cfg())).to_dict()
    d["ratio"] = 1.5
    with pytest.raises(ConfigError, match="ratio"):
        vr.resolved_from_env({vr.RESOLVED_ENV: json.dumps(d)})
    with pytest.raises(ConfigError, match="not JSON"):
        vr.resolved_from_env({vr.RESOLVED_ENV: "{oops"})
    with pytest.raises(ConfigError, match="not set"):
        vr.resolved_from_env({})


def test_old_per_coefficient_variable_is_refused_with_the_new_key():
    r = resolve(config_from_dict(_cfg()))
    with pytest.raises(ConfigError, match=r"A3PO_ALPHA_POS is no longer read — pass a3po\.algorithm\.alpha_pos"):
        vr.resolved_from_env({vr.RESOLVED_ENV: vr.resolved_env(r), "A3PO_ALPHA_POS": "2"})


# ---------------------------------------------------------------- rows
def _batch(entropy=True):
    """2 prompts x 2 responses: group a = (correct, wrong), group b = (wrong, wrong)."""
    torch.manual_seed(0)
    B, T = 4, 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0]).unsqueeze(-1) * mask
    return vr.VerlBatch(
        responses=torch.arange(B * T).reshape(B, T) % 7 + 1,
        response_mask=mask,
        old_log_probs=-torch.rand(B, T) * 2,
        advantages=adv,
        scores=torch.tensor([1.0, 0.0, 0.0, 0.0]),
        uid=["a", "a", "b", "b"],
        entropy=torch.rand(B, T) if entropy else None,
        prompts=["p-a", "p-a", "p-b", "p-b"],
    )


def _text(ids):
    return [f"<{int(i)}>" for i in ids]


def _decode(rows):
    return ["".join(f"<{i}>" for i in r) for r in rows]


def _resolved(**algo) -> ResolvedAlgorithm:
    return resolve(config_from_dict(_cfg(*[f"a3po.algorithm.{k}={v}" for k, v in algo.items()])))


def test_rows_hold_verls_raw_and_the_engines_shaped_advantages():
    b, r = _batch(), _resolved(decay="constant", alpha_pos=3, alpha_neg=2)
    tables, metrics, _ = vr.step_records("run", 4, b, r, _text, _decode)
    ro, tok = tables["rollouts"].to_pandas(), tables["tokens"].to_pandas()
    assert len(ro) == 4 and len(tok) == int(b.response_mask.sum()) == 5 + 3 + 5 + 1
    assert list(ro.polarity) == [1, -1, 0, 0] and list(ro.group_idx) == [0, 0, 1, 1]
    assert list(ro.correct) == [True, False, False, False] and ro.prompt[0] == "p-a"
    assert ro.response[1] == "<6><7><1>"  # arange 5, 6, 7 -> %7+1 = 6, 7, 1, cut at the mask
    ref = shape_tokens(r, b.advantages, torch.tensor([1, -1, 0, 0]), b.response_mask, logprobs=b.old_log_probs, step=3)
    m = b.response_mask.bool()
    assert np.allclose(tok.adv_shaped, ref.adv[m].numpy()) and np.allclose(tok.adv_raw, b.advantages[m].numpy())
    assert (tok.adv_shaped != tok.adv_raw).any()  # the rules did act (3x / 2x on key tokens)
    assert np.allclose(tok.entropy, b.entropy[m].numpy()) and set(tok.step) == {4}
    assert metrics["alpha_pos"] == 3.0 and metrics["acc"] == 0.25 and metrics["length_neg"] == 3.0  # row 1 only


def test_entropy_not_computed_is_nan():
    tables, metrics, _ = vr.step_records("run", 1, _batch(entropy=False), _resolved(), _text, _decode)
    assert tables["tokens"].to_pandas().entropy.isna().all()
    assert np.isnan(metrics["entropy"]) and metrics["length"] == 3.5  # "not measured", the rest is


def test_decay_runs_on_finished_steps():
    """verl's global step 1 is shaped at 0 finished steps (alpha0), step 6 at 5 of S = 10."""
    r = _resolved(alpha_pos=2, alpha_neg=2, decay="linear")
    a1 = vr.step_records("run", 1, _batch(), r, _text, _decode).shaped.alpha_pos
    a6 = vr.step_records("run", 6, _batch(), r, _text, _decode).shaped.alpha_pos
    assert a1 == 2.0 and a6 == pytest.approx(decay_alpha(2.0, 5, 10, "linear", r.decay_rate)) and a6 < 2.0


def _writer(tmp_path, ckpt="ckpt", run_id=None, name="verl-run"):
    cfg = _cfg(f"a3po.run_name={name}")
    r = resolve(config_from_dict(cfg))
    return vr.RunWriter(Store(tmp_path / "runs"), cfg, r.to_dict(), str(tmp_path / ckpt), run_id), r


def test_written_run_opens_in_the_store_and_replays(tmp_path):
    w, r = _writer(tmp_path)
    w.total_steps = 40  # what verl's trainer computed (dataloader length x epochs)
    for step in (1, 2):
        w.write(step, vr.step_records("pending", step, _batch(), r, _text, _decode))
    w.finish()
    store = Store(tmp_path / "runs")
    meta = store.read_run(w.run_id)
    assert meta["status"] == "finished" and meta["last_step"] == 2 and meta["total_steps"] == 40
    assert resolved_from_dict(meta["resolved"]) == r
    config_from_dict(meta["config"])
    assert store.query("select count(*) n from steps", run_ids=[w.run_id]).n[0] == 2
    assert set(store.query("select distinct run_id from tokens", run_ids=[w.run_id]).run_id) == {w.run_id}
    sb = load_step(store, w.run_id, 2)
    assert torch.equal(sb.mask.bool(), _batch().response_mask.bool())
    assert list(sb.polarity.tolist()) == [1, -1, 0, 0]


def test_resume_continues_the_run_and_drops_later_steps(tmp_path):
    w, r = _writer(tmp_path)
    for step in (1, 2, 3):
        w.write(step, vr.step_records("pending", step, _batch(), r, _text, _decode))
    w.finish(KeyboardInterrupt())
    # verl resumed from its step-2 checkpoint: the next step it runs is 3
    w2, _ = _writer(tmp_path)
    w2.write(3, vr.step_records("pending", 3, _batch(), r, _text, _decode))
    assert w2.run_id == w.run_id
    store = Store(tmp_path / "runs")
    assert list(store.query("select step from steps order by step", run_ids=[w.run_id]).step) == [1, 2, 3]
    # a fresh start (step 1) in the same checkpoint folder is a new run (under a new name: the old
    # name is taken, which verl_main refuses before Ray starts, see check_run_name)
    w3, _ = _writer(tmp_path, name="verl-run-2")
    assert w3.open(1) == "verl-run-2"
    store = Store(tmp_path / "runs")
    with pytest.raises(StoreError, match="already exists"):
        vr.check_run_name(store, "verl-run", None, str(tmp_path / "other-ckpt"))
    vr.check_run_name(store, "verl-run-2", None, str(tmp_path / "ckpt"))  # this folder resumes it: fine
    vr.check_run_name(store, "verl-run", "verl-run", None)  # a3po.run_id continues it: fine


def test_explicit_run_id_is_continued(tmp_path):
    w, r = _writer(tmp_path, ckpt="a")
    w.write(1, vr.step_records("pending", 1, _batch(), r, _text, _decode))
    w.finish()
    w2, _ = _writer(tmp_path, ckpt="b", run_id=w.run_id)
    assert w2.open(2) == w.run_id


def test_example_config_is_a_valid_engine_config():
    assert (ROOT / "configs" / "demo.yaml").exists()
    cfg = _cfg(f"a3po.config={ROOT / 'configs' / 'demo.yaml'}")
    assert cfg["algorithm"]["name"] == "a3po"


def test_a_verl_written_run_opens_on_every_app_page(tmp_path, monkeypatch):
    """Runs, Rollouts and Playground (which rebuilds run.json's config and replays a stored step)."""
    from streamlit.testing.v1 import AppTest

    w, r = _writer(tmp_path)
    for step in (1, 2):
        w.write(step, vr.step_records("pending", step, _batch(), r, _text, _decode))
    w.finish()
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "runs"))
    for page, state in (
        ("runs.py", {}),
        ("rollouts.py", {"run": w.run_id}),
        ("playground.py", {"run": w.run_id, "pg_step": 2}),
    ):
        at = AppTest.from_file(str(ROOT / "app" / "pages" / page), default_timeout=90)
        for k, v in state.items():
            at.session_state[k] = v
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        if page == "rollouts.py":  # the verl run's tokens, key tokens marked
            html = "".join(h.proto.body for h in at.get("html"))
            assert 'class="tok key"' in html and "&lt;6&gt;" in html
        if page == "playground.py":  # replayed with the run's own config: the same key tokens
            assert int(at.metric[0].value) > 0
    assert (
        w.run_id in AppTest.from_file(str(ROOT / "app" / "pages" / "runs.py")).run().dataframe[0].value.run_id.tolist()
    )


def test_steps_are_compacted_and_a_resume_still_drops_later_ones(tmp_path):
    cfg = _cfg("a3po.run_name=c", "a3po.train.compact_every=2")
    r = resolve(config_from_dict(cfg))
    store = Store(tmp_path / "runs")
    w = vr.RunWriter(store, cfg, r.to_dict(), str(tmp_path / "ckpt"))
    for step in (1, 2, 3):
        w.write(step, vr.step_records("pending", step, _batch(), r, _text, _decode))
    assert sorted(p.name for p in (store.run_dir(w.run_id) / "chunks").glob("steps-*")) == [
        "steps-000001-000002.parquet"
    ]
    w2 = vr.RunWriter(store, cfg, r.to_dict(), str(tmp_path / "ckpt"))
    w2.write(2, vr.step_records("pending", 2, _batch(), r, _text, _decode))  # resumed from step 1
    w2.finish()
    assert list(store.query("select step from steps order by step", run_ids=[w.run_id]).step) == [1, 2]
    assert store.query("select count(*) n from rollouts", run_ids=[w.run_id]).n[0] == 8
