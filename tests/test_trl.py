"""TRL integration for real: GRPOTrainer steps on the embedded models on CPU, rows the app reads."""

import json
import os
import subprocess
import sys

import pytest

trl = pytest.importorskip("trl")  # installed by the [test] extra, so CI runs this

import torch  # noqa: E402
from conftest import ROOT, free_port  # noqa: E402
from datasets import Dataset  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from engine.config import ConfigError, config_from_dict  # noqa: E402
from engine.integrations.trl import A3POGRPOTrainer, truncated_rows  # noqa: E402
from engine.model.policy import load_policy  # noqa: E402
from engine.shaping.advantage import decay_alpha  # noqa: E402
from engine.store.store import Store  # noqa: E402
from engine.tasks.problems import load_problems  # noqa: E402
from engine.tasks.reward import is_correct  # noqa: E402

PAGES = ROOT / "app" / "pages"


def reward(completions, answer, **kw):
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]


def arith(tok, n):
    return Dataset.from_list(
        [
            {"prompt": tok.bos_token + p.prompt, "answer": p.answer}
            for p in load_problems("builtin:arith", "train", limit=n)
        ]
    )


def grpo_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=48,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        learning_rate=1e-5,
        save_strategy="no",
        temperature=1.0,
        top_k=0,
        beta=0.0,
        seed=0,
        bf16=False,
    )
    return trl.GRPOConfig(**{**base, **kw})


def trainer(tmp_path, n=32, a3po=None, store=True, **kw):
    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    return A3POGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=grpo_args(tmp_path, **kw),
        train_dataset=arith(tok, n),
        processing_class=tok,
        a3po=a3po,
        store=str(tmp_path / "runs") if store else None,
        run_name="trl-a3po",
        data="builtin:arith",
        model_path="builtin:tiny",
    )


def run_page(name, **state):
    at = AppTest.from_file(str(PAGES / name), default_timeout=60)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_trl_two_steps_write_rows_the_app_reads(tmp_path, monkeypatch):
    tr = trainer(tmp_path)
    tr.train()
    store = Store(tmp_path / "runs")
    meta = store.read_run("trl-a3po")
    assert meta["status"] == "finished" and meta["last_step"] == 2 and meta["total_steps"] == 2
    tok_rows = store.query("select step, rollout_idx, is_key, adv_raw, adv_shaped, polarity from tokens")
    ro = store.query("select * from rollouts")
    assert len(ro) == 2 * 8 and len(tok_rows) == int(ro.length.sum()) > 0
    assert sorted(tok_rows.step.unique()) == [1, 2]
    # the engine's A3PO shaping acted: keys picked per response, unpicked tokens keep the raw advantage
    assert tok_rows.is_key.any()
    plain = tok_rows[~tok_rows.is_key]
    assert (abs(plain.adv_shaped - plain.adv_raw) < 1e-6).all()
    # polarity is the verifier's verdict
    assert set(ro.polarity) <= {1, -1} and ((ro.polarity == 1) == ro.correct).all()

    # run.json holds an engine config that the engine itself accepts
    cfg = config_from_dict({k: v for k, v in meta["config"].items() if k != "name"})
    assert cfg.algorithm.name == "a3po" and cfg.algorithm.decay_rate == 5.0 and cfg.algorithm.decay_steps is None
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.train.steps) == (4, 48, 2)
    assert (cfg.model.path, cfg.data.train) == ("builtin:tiny", "builtin:arith")
    # the step columns the Runs page plots
    steps = store.query("select * from steps order by step")
    assert {"reward", "acc", "entropy", "length", "push_rule_pos", "push_raw_neg", "alpha_pos"} <= set(steps.columns)
    assert list(steps.acc) == [float(ro[ro.step == s].correct.mean()) for s in (1, 2)]
    assert list(steps.alpha_pos) == [2.0, 1.5]  # linear: 1 + (2 - 1)(1 - s/2) at s = 0, 1
    # the same columns the trainer fills, derived from the rows (engine.store.schema.metrics_from_rollouts)
    assert list(steps.n_rollouts) == [8.0, 8.0] and steps.truncated_frac.notna().all()
    assert list(steps.key_frac) == [
        pytest.approx(float(ro[ro.step == s].n_key.sum() / ro[ro.step == s].length.sum())) for s in (1, 2)
    ]
    assert (steps.t_store > 0).all() and (steps.time > 0).all()  # timed by Store.write_step
    assert steps.clipfrac.isna().all()  # TRL's own loss metrics are not recorded: null, not missing

    # the app's pages open the TRL run
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "runs"))
    at = run_page("rollouts.py", run="trl-a3po")
    assert 'class="tok' in "".join(h.proto.body for h in at.get("html"))
    at = run_page("runs.py")
    assert "trl-a3po" in at.dataframe[0].value.run_id.tolist()
    at.multiselect(key="runs_sel").set_value(["trl-a3po"]).run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    at = run_page("playground.py", run="trl-a3po")
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["playground_settings"]["source_run"] == "trl-a3po"


def test_epoch_based_run_decays_over_the_real_horizon(tmp_path):
    # max_steps=-1: TRL derives the horizon from the data (12 prompts x 4 generations / 8 per step = 6 steps)
    tr = trainer(tmp_path, n=12, max_steps=-1, num_train_epochs=1, max_completion_length=8)
    tr.train()
    S = tr.state.max_steps
    assert S == 6 and tr.args.max_steps == -1
    steps = Store(tmp_path / "runs").query("select step, alpha_pos, alpha_neg from steps order by step")
    assert list(steps.step) == list(range(1, S + 1))
    # stored step s was shaped at TRL global step s - 1: alpha = 1 + (2 - 1)(1 - (s - 1)/6)
    want = [decay_alpha(2.0, s - 1, S, "linear") for s in steps.step]
    assert list(steps.alpha_pos) == pytest.approx(want) and list(steps.alpha_neg) == pytest.approx(want)
    assert want[-1] == pytest.approx(1 + 1 / 6)
    cfg = Store(tmp_path / "runs").read_run("trl-a3po")["config"]
    assert cfg["train"]["steps"] == 6


def test_old_policy_forward_is_chunked_like_trl(tmp_path, monkeypatch):
    tr = trainer(tmp_path, store=False, per_device_train_batch_size=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (10, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0  # one padded row
    seen = []
    real = tr._get_per_token_logps_and_entropies

    def spy(*a, **kw):
        seen.append(kw.get("batch_size"))
        return real(*a, **kw)

    monkeypatch.setattr(tr, "_get_per_token_logps_and_entropies", spy)
    lp, ent = tr._a3po_old_logps(ids, mask, 5)
    assert seen == [4]  # TRL's per_device_train_batch_size
    with torch.no_grad():
        lp_all, ent_all, _ = real(tr.model, ids, mask, 5, batch_size=None, compute_entropy=True)
    assert lp.shape == (10, 5)
    torch.testing.assert_close(lp, lp_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_all, rtol=1e-5, atol=1e-5)


def test_eval_batches_keep_trls_advantages_and_write_nothing(tmp_path, monkeypatch):
    tr = trainer(tmp_path)
    fixed = {
        "prompt_ids": torch.ones(4, 2, dtype=torch.long),
        "prompt_mask": torch.ones(4, 2, dtype=torch.long),
        "completion_ids": torch.ones(4, 3, dtype=torch.long),
        "completion_mask": torch.ones(4, 3, dtype=torch.long),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
    }
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(fixed))
    tr.model.eval()
    out = tr._generate_and_score_completions([{"prompt": "1+1=", "answer": "2"}] * 4)
    assert out["advantages"] is fixed["advantages"]  # TRL's (B,) advantages, untouched
    assert Store(tmp_path / "runs").run_ids() == []
    tr.model.train()  # the same batch in training is shaped to (B, T) and logged
    out = tr._generate_and_score_completions([{"prompt": "1+1=", "answer": "2"}] * 4)
    assert out["advantages"].shape == (4, 3)
    assert Store(tmp_path / "runs").run_ids() == ["trl-a3po"]


@pytest.mark.parametrize(
    "a3po, match",
    [
        (
            {"alpha_p0s": 3},
            r"unknown A3PO option\(s\) 'alpha_p0s' — use only ratio, alpha_pos, .*decay_rate, decay_steps",
        ),
        ({"rate": 3.0}, r"'rate' — use only .*decay_rate"),
        ({"alpha_pos": -1.0}, r"algorithm.alpha_pos"),
        ({"decay": "sideways"}, r"algorithm.decay"),
        ({"decay_steps": 0}, r"algorithm.decay_steps"),
    ],
)
def test_bad_a3po_options_are_refused_in_one_line(tmp_path, a3po, match):
    with pytest.raises(ConfigError, match=match) as e:
        trainer(tmp_path, a3po=a3po)
    assert "\n" not in str(e.value) and " — " in str(e.value)


def test_decay_steps_sets_the_horizon(tmp_path):
    tr = trainer(tmp_path, a3po={"decay_steps": 4, "decay_rate": 2.0, "decay": "exponential"}, max_completion_length=8)
    tr.train()
    steps = Store(tmp_path / "runs").query("select step, alpha_pos from steps order by step")
    assert list(steps.alpha_pos) == pytest.approx([decay_alpha(2.0, s, 4, "exponential", 2.0) for s in (0, 1)])


def test_two_processes_both_shards_in_the_store(tmp_path):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo): the main process writes both shards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "examples" / "trl_a3po.py"),
        "--steps",
        "2",
        "--batch",
        "4",
        "--generations",
        "4",
        "--max-tokens",
        "16",
        "--prompts",
        "16",
        "--store",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        "--run-name",
        "two",
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    store = Store(tmp_path / "runs")
    assert store.read_run("two")["status"] == "finished"
    ro = store.query("select step, rollout_idx, group_idx from rollouts order by step, rollout_idx")
    # 4 completions per process and step, 2 processes: 8 rollouts per step, one group of 4 per process
    assert ro.groupby("step").size().to_dict() == {1: 8, 2: 8}
    assert ro[ro.step == 1].rollout_idx.tolist() == list(range(8))
    assert ro[ro.step == 1].group_idx.tolist() == [0] * 4 + [1] * 4
    tok = store.query("select step, count(distinct rollout_idx) n from tokens group by step order by step")
    assert tok.n.tolist() == [8, 8]
    cfg = json.loads(json.dumps(store.read_run("two")["config"]))
    assert config_from_dict({k: v for k, v in cfg.items() if k != "name"}).train.prompts_per_step == 2


def test_trl_args_the_engine_refuses_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="rollout.temperature"):
        trainer(tmp_path, temperature=500.0)


def test_truncated_rows_by_hand():
    eos = 2
    ids = torch.tensor([[5, 6, 7], [5, 2, 0], [5, 6, 2], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    # only the first is as long as allowed without ending in EOS
    assert truncated_rows(ids, mask, 3, eos).tolist() == [True, False, False, False]
    assert truncated_rows(ids, mask, 3, None).tolist() == [True, False, True, False]
