"""Rows with no gradient stay out of the update's forward/backward (``actor.skip_zero_advantage``).

A token with advantage 0 adds exactly 0 to the clipped surrogate and to its gradient, so leaving out
the rows whose every token has advantage 0 (and no KL term) must change nothing: the same loss, the
same gradient, the same optimizer state, the same weights after several steps, and the same clipfrac.
Checked by hand for ``active_rows``, on one real backward, and on whole trainer steps, including a
step where every row is left out (Adam still moves the weights with its moments).
"""

import tempfile

import pytest
import torch

import engine.update.shares as upd
from engine.config import load_config
from engine.model.policy import load_policy
from engine.resources import demo_config
from engine.rollout.base import Rollouts, SamplingParams
from engine.rollout.kv import KVEngine
from engine.store.store import Store
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts
from engine.train.trainer import Trainer
from engine.update.loss import agg_weights
from engine.update.shares import LossSpec, Share, active_rows, backward, take


def _share(adv, mask, ref=None):
    b, t = adv.shape
    ids = torch.arange(1, b * 2 + 1).view(b, 2)
    ro = Rollouts(ids, torch.ones(b, 2, dtype=torch.long), ids[:, :1].repeat(1, t), mask, torch.zeros(b).bool())
    w = agg_weights(mask, "token-mean")
    kl_w = None if ref is None else agg_weights(mask, "token-mean")
    return Share(ro, torch.zeros(b, t), adv, w, ref, kl_w)


def test_active_rows_by_hand():
    nan = float("nan")
    adv = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 3.0], [0.0, -0.0, 0.0], [nan, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    # row 0: all zero; row 1: nonzero on real tokens; row 2: nonzero only on padding (weight 0);
    # row 3: -0.0 is zero; row 4: NaN counts (it must reach the loss and show up there)
    assert active_rows(_share(adv, mask), 0.0).tolist() == [False, True, False, False, True]
    # a KL term gives every row with a real token a gradient; a zero coefficient does not
    ref = torch.zeros(5, 3)
    assert active_rows(_share(adv, mask, ref), 0.1).tolist() == [True] * 5
    assert active_rows(_share(adv, mask, ref), 0.0).tolist() == [False, True, False, False, True]
    # an empty row (no real token) has no weight, so it is never active
    empty = torch.tensor([[0, 0, 0], [1, 0, 0]])
    assert active_rows(_share(torch.ones(2, 3), empty, torch.zeros(2, 3)), 0.1).tolist() == [False, True]


def test_take_cuts_rows_and_columns():
    adv = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    part = take(_share(adv, mask), torch.tensor([0, 1]))
    assert part.advantages.tolist() == [[1.0, 2.0], [3.0, 0.0]]  # column 2 is padding in both rows
    assert part.rollouts.response_mask.tolist() == [[1, 1], [1, 0]]
    torch.testing.assert_close(part.weights, torch.full((2, 2), 1 / 6) * part.rollouts.response_mask)


def test_backward_of_the_active_rows_equals_the_whole():
    """Zero-advantage rows removed: the same loss and gradient, to float rounding."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
        prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
        ro = KVEngine(model, tok).generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=4))
        adv = torch.randn(ro.response_ids.shape, generator=torch.Generator().manual_seed(2))
        adv[3:6] = 0.0  # group 1 got one reward for all its samples
        adv[9] = 0.0  # one more row, inside a group
        old = ro.logprobs - 0.05  # ratios away from 1: some tokens clip
        m = ro.response_mask
        whole = Share(ro, old, adv, agg_weights(m, "token-mean"))
        spec = LossSpec(0.2, 0.28, 3.0, 1.0, 0, True)
        on = active_rows(whole, spec.kl_coef)
        assert on.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False, True, True]
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        grads = []
        for share in (whole, take(whole, on.nonzero().squeeze(1))):
            model.zero_grad(set_to_none=True)
            res = backward(model, share, spec)
            grads.append((res.loss, [p.grad.clone() for p in params]))
        (l0, g0), (l1, g1) = grads
        assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-7)
        assert any(g.abs().sum() > 0 for g in g0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("workers", [1, 2])
def test_trainer_steps_with_and_without_the_skip_land_on_the_same_weights(monkeypatch, workers):
    """Three steps; the third scores every sample wrong, so every row is left out and only Adam's
    moments move the weights. Skip on or off: the same weights, loss and clipfrac after each step, and
    fewer rows through the update's forward (counted in this process: all of them with one worker)."""
    base = [
        "rollout.backend=kv",
        f"rollout.workers={workers}",
        f"train.threads={workers}",
        "train.prompts_per_step=4",
        "rollout.n=4",
        "rollout.max_new_tokens=40",
        "model.path=builtin:tiny",  # the arith task: this seed gives mixed and uniform groups in steps 1-2
        "data.train=builtin:arith",
        "data.test=builtin:arith",
        "actor.mini_batches=2",
        "actor.lr=1e-3",
        "seed=5",
    ]
    rows_seen = []
    real = upd.response_logits
    monkeypatch.setattr(
        upd,
        "response_logits",
        lambda m, ro, *a, **k: rows_seen.append(ro.response_ids.shape[0]) or real(m, ro, *a, **k),
    )
    n = torch.get_num_threads()
    out = {}
    for skip in (False, True):
        cfg = load_config(demo_config(), [*base, f"actor.skip_zero_advantage={str(skip).lower()}"])
        rows_seen.clear()
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(cfg, Store(d), log=lambda s: None)
            try:
                steps = []
                for s in (1, 2, 3):
                    if s == 3:
                        tr.verify = lambda text, problem: False  # all groups all-wrong: zero advantages
                    before = len(rows_seen)
                    m, _ = tr.step(s)
                    w = [p.detach().clone() for p in tr.model.parameters()]
                    steps.append((m, w, sum(rows_seen[before:])))
                out[skip] = steps
            finally:
                tr.backend.close()
    torch.set_num_threads(n)
    uniform = 0
    for (m0, w0, r0), (m1, w1, r1) in zip(out[False], out[True]):
        for k in ("loss", "clipfrac", "grad_norm"):
            assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6), k
        for a, b in zip(w1, w0):
            # Adam divides by sqrt(v): on an entry whose gradient is at float-rounding level, rounding
            # differences of the smaller batch become up to a whole step of lr (1e-3). 2e-5 is 2% of one.
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        left_out = round((m0["frac_all_correct"] + m0["frac_all_wrong"]) * 4) * 4  # rows of uniform groups
        if workers == 1:  # (with two, the helper process runs its share's forward where this cannot count it)
            assert r0 == 16 and r1 == 16 - left_out
        uniform += left_out
    assert out[True][2][2] == 0  # the all-wrong step ran no forward at all (not even the trainer's share)
    assert out[True][2][0]["loss"] == 0.0
    assert any(a.ne(b).any() for a, b in zip(out[True][2][1], out[True][1][1]))  # Adam still moved them
    assert uniform > 16  # steps 1-2 left rows out too, beyond the forced step
