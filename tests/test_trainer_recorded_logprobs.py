"""The trainer uses the kv engine's recorded old-policy log-probs instead of a second forward.

One real step of 2 prompts x 4 rollouts on the embedded model, with mini_batches=2 so the update is
not the single on-policy pass and the old-policy forward is a separate no-grad pass. The recorded and
the recomputed paths must give the same loss and metrics (same rollouts: the engine has its own
seeded generator), and the recorded path must run one forward fewer.
"""

import math

import pytest
import torch

import engine.train.trainer as trainer_mod
import engine.update.shares as update_mod
from engine.config import load_config
from engine.store.store import Store
from engine.train.trainer import Trainer

BASE = [
    "train.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "eval.n_prompts=4",
    "train.eval_every=0",
    "train.save_final_model=false",
    "train.steps=2",
    "train.threads=1",
    "rollout.backend=kv",
    "actor.skip_zero_advantage=false",  # every row's forward runs, so the forward counts below are fixed
]
COMPARED = [
    "loss",
    "grad_norm",
    "clipfrac",
    "approx_kl",
    "entropy",
    "entropy_pos",
    "entropy_neg",
    "key_frac",
    "push_pos",
    "push_neg",
    "push_rule_pos",
    "push_rule_neg",
    "reward",
    "length",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def one_step(tmp_path, monkeypatch, name, *overrides):
    """Metrics and tables of step 1, and how many times the trainer ran ``response_logits``."""
    calls = []
    real = trainer_mod.response_logits

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "response_logits", counting)  # the old policy's forward
    monkeypatch.setattr(update_mod, "response_logits", counting)  # the update's
    cfg = load_config(None, [*BASE, f"name={name}", *overrides])
    tr = Trainer(cfg, Store(tmp_path / name), log=lambda s: None)
    try:
        metrics, tables = tr.step(1)
    finally:
        tr.store.release_writer(tr.run_id)
    return metrics, tables, len(calls)


def close(a, b, tol=1e-4):
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def near_tie_swaps(a, b, tol=1e-5):
    """Rows of two token tables whose key-token flag differs, checked to be swaps of near-tied tokens.

    Key tokens are the lowest/highest-probability ones of each response: two tokens whose log-probs
    agree to float rounding (e.g. both at probability ~1) may trade places between two forwards that
    round differently. Anything else is a real difference. Returns the boolean mask of swapped rows."""
    diff = a["is_key"].to_numpy() != b["is_key"].to_numpy()
    for _, rows in a[diff].groupby("rollout_idx"):
        gained = rows[rows["is_key"]]  # key in a only
        lost = rows[~rows["is_key"]]  # key in b only
        assert len(gained) == len(lost), "a different number of key tokens in one response"
        for x, y in zip(sorted(gained["logprob"]), sorted(lost["logprob"])):
            assert abs(x - y) < tol, ("a key token changed that is not a near tie", x, y)
    return diff


@pytest.mark.parametrize("mini_batches,algo", [(2, "a3po"), (1, "a3po"), (2, "dapo")])
def test_recorded_and_recomputed_old_logprobs_give_the_same_step(tmp_path, monkeypatch, mini_batches, algo):
    # dapo: dynamic sampling may merge groups from several generation rounds (recorded log-probs merged too)
    over = [f"actor.mini_batches={mini_batches}", f"algorithm.name={algo}"]
    rec, rec_tables, rec_calls = one_step(tmp_path, monkeypatch, "rec", *over)
    re, re_tables, re_calls = one_step(tmp_path, monkeypatch, "re", *over, "actor.recompute_old_logprobs=true")
    assert rec["gen_rounds"] == re["gen_rounds"]
    if algo == "dapo":
        assert rec["gen_rounds"] >= 2  # this seed needs a second round: the merge of rounds is exercised
    for k in COMPARED:
        assert close(rec[k], re[k]), (k, rec[k], re[k])
    # the per-token tables (log-probs, entropies, key tokens) agree too
    a, b = rec_tables["tokens"], re_tables["tokens"]
    assert a.num_rows == b.num_rows > 0
    for col in ("logprob", "entropy"):
        assert abs(a[col].to_numpy() - b[col].to_numpy()).max() < 1e-4, col
    swapped = near_tie_swaps(a.to_pandas(), b.to_pandas())
    keep = ~swapped
    assert abs(a["adv_shaped"].to_numpy()[keep] - b["adv_shaped"].to_numpy()[keep]).max() < 1e-4
    if mini_batches == 2:
        # recompute: 1 no-grad old-policy forward + 2 mini-batch forwards; recorded: the 2 mini-batch ones only
        assert (re_calls, rec_calls) == (3, 2)
    else:
        # the single on-policy pass needs its forward for the gradient either way
        assert (re_calls, rec_calls) == (1, 1)
        assert rec["approx_kl"] == 0.0


@pytest.mark.parametrize(
    "backend,over,expect",
    [
        ("kv", ["actor.mini_batches=2"], "zero"),  # the recorded log-probs are the old policy: 0 by construction
        ("kv", ["actor.mini_batches=2", "actor.recompute_old_logprobs=true"], "small"),  # kv decode vs trainer forward
        ("kv", ["actor.mini_batches=1"], "small"),  # the single pass's forward is the trainer's
        ("hf", ["actor.mini_batches=2"], "unmeasured"),  # transformers' generate gives no log-probs
    ],
)
def test_the_sampler_logprob_is_stored_per_token_with_the_steps_mismatch(tmp_path, monkeypatch, backend, over, expect):
    metrics, tables, _ = one_step(tmp_path, monkeypatch, f"mm-{backend}", f"rollout.backend={backend}", *over)
    t = tables["tokens"].to_pandas()
    assert len(t) > 0
    names = ("abs", "kl", "ratio_min", "ratio_q01", "ratio_q99", "ratio_max", "out_frac")
    if expect == "unmeasured":
        assert t.rollout_logprob.isna().all()
        assert all(math.isnan(metrics[f"mismatch_{k}"]) for k in names)
        return
    assert t.rollout_logprob.notna().all()
    d = (t.logprob - t.rollout_logprob).abs()
    assert metrics["mismatch_abs"] == pytest.approx(d.mean(), rel=1e-4, abs=1e-9)
    if expect == "zero":
        assert d.max() == 0 and metrics["mismatch_kl"] == 0 and metrics["mismatch_out_frac"] == 0
    else:  # the same float32 weights through two forwards: rounding only, every ratio inside the band
        assert 0 < d.max() < 1e-4 and metrics["mismatch_out_frac"] == 0
        assert 0 <= metrics["mismatch_kl"] < 1e-8
        assert metrics["mismatch_ratio_min"] <= 1 <= metrics["mismatch_ratio_max"]


def test_truncated_importance_weights_by_hand():
    """actor.rollout_is=token: min(π_train/π_rollout, threshold) per token, 1 where the sampler gave none."""
    from types import SimpleNamespace as NS

    from engine.rollout.base import Rollouts

    cfg = load_config(None, ["rollout.backend=kv", "actor.rollout_is=token", "actor.rollout_is_threshold=2"])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    ro = Rollouts(*(torch.zeros(1, 4),) * 5, torch.tensor([[-1.0, -3.0, float("nan"), -0.5]]))
    w = Trainer._rollout_is(NS(cfg=cfg), ro, old)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, 1.0, math.exp(-0.5)])  # e^1 capped at 2
    off = load_config(None, ["rollout.backend=kv"])
    assert Trainer._rollout_is(NS(cfg=off), ro, old) is None


def test_truncated_importance_sampling_is_refused_without_sampler_logprobs_and_a_no_op_at_ratio_one(
    tmp_path, monkeypatch
):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="actor.rollout_is.*rollout.backend=hf does not record"):
        load_config(None, ["rollout.backend=hf", "actor.rollout_is=token"])
    # kv's recorded log-probs are the old policy's: every ratio is 1, so the step is the same as without
    on, _, _ = one_step(tmp_path, monkeypatch, "tis-on", "actor.mini_batches=2", "actor.rollout_is=token")
    off, _, _ = one_step(tmp_path, monkeypatch, "tis-off", "actor.mini_batches=2")
    for k in ("loss", "grad_norm", "clipfrac", "approx_kl"):
        assert on[k] == off[k], k
