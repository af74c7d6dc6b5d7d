"""The update split between CPU worker processes (``actor.split_update``) and into micro-batches
(``actor.micro_batch_tokens``), engine/update/shares.py.

The aggregation weights make any split of the rows add up to the whole mini-batch's loss; shares
are cut at group starts with about equal tokens; the pool's gradient (helper's share + caller's
share) equals one process's gradient of the whole mini-batch; micro-batches give the same loss,
KL term, log-probs and gradient as one backward; and a trainer step with the split, or with
micro-batches, lands on the same weights as one without.
"""

import tempfile

import pytest
import torch

import engine.update.shares as upd
from engine.config import load_config
from engine.model.policy import load_policy
from engine.model.workers import WorkerError
from engine.resources import demo_config
from engine.rollout.base import SamplingParams
from engine.rollout.kv import KVEngine
from engine.store.store import Store
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts
from engine.train.trainer import Trainer
from engine.update.loss import AGG_MODES, agg_weights, aggregate_loss
from engine.update.shares import LossSpec, Share, backward, group_shares, pool_backward, split_share


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_weights_add_up_over_any_split_of_rows(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    w = agg_weights(mask, mode, 6.0)
    whole = aggregate_loss(loss, mask, mode, 6.0)
    parts = sum((loss[s] * w[s]).sum() for s in (slice(0, 2), slice(2, 3), slice(3, 5)))
    torch.testing.assert_close(parts, whole)
    assert (w[mask == 0] == 0).all()


def test_agg_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(agg_weights(mask, "token-mean"), torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))
    torch.testing.assert_close(agg_weights(mask, "seq-mean-token-sum"), torch.tensor([[0.5, 0.5, 0], [0.5, 0, 0]]))
    torch.testing.assert_close(agg_weights(mask, "seq-mean-token-mean"), torch.tensor([[0.25, 0.25, 0], [0.5, 0, 0]]))
    torch.testing.assert_close(agg_weights(mask, "seq-mean-token-sum-norm"), mask / 3.0)
    torch.testing.assert_close(agg_weights(mask, "seq-mean-token-sum-norm", 4.0), mask / 4.0)
    assert agg_weights(torch.zeros(2, 3), "token-mean").abs().sum() == 0  # empty mask: no weight, no nan
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        agg_weights(mask, "sum")


def test_group_shares_by_hand():
    # prompts A A | B B B | C (left padding differs only where the mask is 0)
    ids = torch.tensor([[0, 5], [0, 5], [6, 7], [6, 7], [6, 7], [0, 8]])
    mask = (ids != 0).long()
    tokens = torch.tensor([1, 1, 5, 5, 5, 1])
    # total 18, half 9: cutting before row 2 leaves 2 tokens before, before row 5 leaves 17: row 2 wins
    assert group_shares(ids, mask, tokens, 2) == [slice(0, 2), slice(2, 6)]
    assert group_shares(ids, mask, torch.tensor([5, 5, 1, 1, 1, 1]), 2) == [slice(0, 2), slice(2, 6)]
    assert group_shares(ids, mask, torch.tensor([1, 1, 1, 1, 1, 9]), 2) == [slice(0, 5), slice(5, 6)]
    assert group_shares(ids, mask, tokens, 3) == [slice(0, 2), slice(2, 5), slice(5, 6)]
    assert group_shares(ids, mask, tokens, 9) == [slice(0, 2), slice(2, 5), slice(5, 6)]  # at most one per group
    assert group_shares(ids, mask, tokens, 1) == [slice(0, 6)]
    one = torch.tensor([[3, 4]] * 4)
    assert group_shares(one, torch.ones_like(one), torch.ones(4), 2) == [slice(0, 4)]  # one group: no split
    # same ids but a different mask is a different prompt
    pad = torch.tensor([[0, 5], [0, 5]])
    assert group_shares(pad, torch.tensor([[0, 1], [1, 1]]), torch.ones(2), 2) == [slice(0, 1), slice(1, 2)]
    # any row may start a share. Total 18, half 9: cutting before row 3 leaves 7 tokens before it, before
    # row 4 leaves 12: row 3 is closer (whole groups could only cut before row 2 or 5)
    assert group_shares(ids, mask, tokens, 2, whole_groups=False) == [slice(0, 3), slice(3, 6)]
    assert group_shares(one, torch.ones_like(one), torch.ones(4), 2, whole_groups=False) == [slice(0, 2), slice(2, 4)]
    # 9 parts: targets 2, 4, 6, ... each take the closest row after the last cut (2, 3, 4, 5), then none is left
    assert group_shares(ids, mask, tokens, 9, whole_groups=False) == [
        slice(0, 2),
        slice(2, 3),
        slice(3, 4),
        slice(4, 5),
        slice(5, 6),
    ]
    # a heavy last row: 3 parts of 14 tokens (targets 4.7, 9.3); row 5 (5 before) is closest, then nothing after it
    assert group_shares(ids, mask, torch.tensor([1, 1, 1, 1, 1, 9]), 3, whole_groups=False) == [
        slice(0, 5),
        slice(5, 6),
    ]


def _shares(ro, old, adv, mode, parts, ref=None):
    m = ro.response_mask
    w = agg_weights(m, mode, float(m.shape[1]))
    kl_w = None if ref is None else agg_weights(m, "token-mean", None)
    return split_share(Share(ro, old, adv, w, ref, kl_w), parts)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_pool_gradient_equals_one_process(mode):
    """Helper share + caller share, gradients added by the pool == one backward of the whole batch."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
    engine = KVEngine(model, tok, workers=2, threads=1)
    try:
        ro = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=3))
        adv = torch.randn(ro.response_ids.shape, generator=torch.Generator().manual_seed(1))
        old = ro.logprobs - 0.05  # ratios away from 1: some tokens clip
        spec = LossSpec(0.2, 0.28, 3.0, 1.0, 0, True)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        model.zero_grad(set_to_none=True)
        (whole,) = _shares(ro, old, adv, mode, 1)
        ref = backward(model, whole[1], spec)
        ref_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        shares = _shares(ro, old, adv, mode, 2)
        assert len(shares) == 2
        res = pool_backward(engine.pool, [s for _, s in shares], spec, params, lambda s: backward(model, s, spec))
        assert sum(r.loss for r in res) == pytest.approx(ref.loss, rel=1e-5, abs=1e-7)
        for p, g in zip(params, ref_grads):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
        for (sl, _), r in zip(shares, res):
            torch.testing.assert_close(r.logprobs, ref.logprobs[sl, : r.logprobs.shape[1]], atol=1e-5, rtol=0)
        # a share the helper cannot run is one clear error, and leaves no answer queued behind it
        b, t = shares[1][1].old_logprobs.shape
        bad = Share(shares[1][1].rollouts, torch.zeros(b + 1, t + 1), shares[1][1].advantages, shares[1][1].weights)
        with pytest.raises(WorkerError, match="rollout worker 1 failed: RuntimeError"):
            pool_backward(engine.pool, [shares[0][1], bad], spec, params, lambda s: backward(model, s, spec))
        again = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=3))
        assert torch.equal(again.response_ids, ro.response_ids)
    finally:
        engine.close()
        torch.set_num_threads(n)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_equal_one_backward(mode, monkeypatch):
    """A share of more than ``micro_batch_tokens`` tokens runs as that many whole-group pieces, one
    forward each, and gives one backward's loss, KL term, log-probs and gradient."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
        prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:5])
        ro = KVEngine(model, tok).generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=4, temperature=1.0))
        adv = torch.randn(ro.response_ids.shape, generator=torch.Generator().manual_seed(2))
        old = ro.logprobs - 0.05
        ref = ro.logprobs + 0.1 * torch.randn(ro.logprobs.shape, generator=torch.Generator().manual_seed(3))
        ((_, share),) = _shares(ro, old, adv, mode, 1, ref=ref * ro.response_mask)
        total = int(ro.attention_mask.sum())
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        forwards = []
        real = upd.response_logits
        monkeypatch.setattr(upd, "response_logits", lambda *a, **k: forwards.append(1) or real(*a, **k))
        out = {}
        for cap in (0, total // 3 + 1):
            spec = LossSpec(0.2, 0.28, 3.0, 1.0, 0, True, "low_var_kl", 0.1, cap)
            forwards.clear()
            model.zero_grad(set_to_none=True)
            res = backward(model, share, spec)
            out[cap] = (res, [p.grad.clone() for p in params], len(forwards))
        (whole, g0, f0), (parts, g1, f1) = out.values()
        assert f0 == 1 and f1 == 3  # five groups, about a third of the tokens each
        assert parts.loss == pytest.approx(whole.loss, rel=1e-5, abs=1e-7)
        assert parts.kl == pytest.approx(whole.kl, rel=1e-5, abs=1e-7) and whole.kl > 0
        torch.testing.assert_close(parts.logprobs, whole.logprobs, atol=1e-5, rtol=0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(n)


def test_trainer_step_with_split_update_lands_on_the_same_weights(monkeypatch):
    """Two mini-batches (so both runs take the recorded old log-probs): split or not, same weights. The
    workers' shares are cut at a row, not at a group: a group cut in two (its prompt computed by both
    processes) gives the same weights too."""
    import engine.train.trainer as trainer_mod

    cut_groups, real_split = [], trainer_mod.split_share

    def recording_split(share, parts, whole_groups=True):
        pieces = real_split(share, parts, whole_groups)
        key = share.rollouts.prompt_ids.masked_fill(share.rollouts.prompt_mask == 0, -1)
        for sl, _ in pieces[1:]:  # a piece starting inside a group: same prompt as the row before it
            cut_groups.append(bool((key[sl.start] == key[sl.start - 1]).all()))
        return pieces

    monkeypatch.setattr(trainer_mod, "split_share", recording_split)
    base = [
        "rollout.backend=kv",
        "rollout.workers=2",
        "train.threads=2",
        "train.prompts_per_step=4",
        "rollout.n=4",
        "rollout.max_new_tokens=16",
        "actor.mini_batches=2",
        "actor.lr=1e-3",
        "seed=5",
    ]
    weights, losses = {}, {}
    initial = None
    n = torch.get_num_threads()
    runs = {
        False: ["actor.split_update=false", "actor.micro_batch_tokens=0"],
        True: ["actor.split_update=true", "actor.micro_batch_tokens=0"],
        # each mini-batch (two groups) in one process as two micro-batches of one group
        "micro": ["actor.split_update=false", "actor.micro_batch_tokens=60"],
    }
    for split, over in runs.items():
        cfg = load_config(demo_config(), [*base, *over])
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(cfg, Store(d), log=lambda s: None)
            # rewards that vary inside groups, so every group has a gradient (the untrained policy
            # solves nothing, and all-wrong groups are left out of the update)
            tr.verify = lambda text, problem: sum(map(ord, text)) % 2 == 0
            try:
                if initial is None:
                    initial = [p.detach().clone() for p in tr.model.parameters()]
                m, _ = tr.step(1)
                weights[split] = [p.detach().clone() for p in tr.model.parameters()]
                losses[split] = m["loss"]
            finally:
                tr.backend.close()
    torch.set_num_threads(n)
    assert any(cut_groups)  # at least one group was split between the two processes
    assert all(g.abs().sum() > 0 for g in (a - b for a, b in zip(weights[False], initial)))  # every weight moved
    for other in (True, "micro"):
        assert losses[other] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)
        # Adam divides by the root of the squared gradient, so float rounding on a near-zero gradient entry
        # (the split adds the processes' gradients in another order) can move that weight by up to one
        # learning-rate step (1e-3); 2e-5 is 2% of it
        for a, b in zip(weights[other], weights[False]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
