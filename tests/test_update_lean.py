"""The lean policy update gives the same numbers as the plain one it replaced.

``Trainer._update`` cuts every mini-batch to its own prompt and response columns and computes
log-probs on the response tokens only. The reference below is the previous update, written out: the
whole batch width for every mini-batch and log-probs on every position. On a real batch from the
embedded model (four groups with prompts and responses of different lengths, eight mini-batches of two rows, so
most mini-batches really lose columns) both must give the same loss, clip fractions, grad norm and
updated weights within 1e-5, for each loss aggregation and with a KL term to a reference model.
"""

import copy

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.model.ops import token_logprobs
from engine.rollout.base import Rollouts
from engine.store.store import Store
from engine.train.trainer import Trainer, response_logits
from engine.update.loss import kl_penalty, masked_mean, policy_loss

BASE = [
    "train.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "actor.mini_batches=8",
    "train.threads=1",
    "train.steps=10",
    "rollout.backend=kv",
    "actor.recompute_old_logprobs=true",  # old log-probs from a forward, so the ratio is exactly the update's
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def reference_update(tr: Trainer, ro: Rollouts, old_lp, adv, ref_lp) -> dict:
    """The update before the cut: full batch width per mini-batch, log-probs everywhere."""
    cfg = tr.cfg
    mask = ro.response_mask
    stats = {"clipfrac": [], "clipfrac_lower": [], "approx_kl": [], "kl_ref": [], "loss": [], "grad_norm": []}
    for mb in [
        mb for _ in range(cfg.actor.ppo_epochs) for mb in torch.arange(adv.shape[0]).chunk(cfg.actor.mini_batches)
    ]:
        sub = Rollouts(
            ro.prompt_ids[mb], ro.prompt_mask[mb], ro.response_ids[mb], ro.response_mask[mb], ro.truncated[mb]
        )
        lp = token_logprobs(response_logits(tr.model, sub, cfg.rollout.temperature), sub.response_ids)
        m = mask[mb]
        loss, met = policy_loss(
            lp,
            old_lp[mb],
            adv[mb],
            m,
            clip_low=tr.clip_low,
            clip_high=tr.clip_high,
            dual_clip=cfg.actor.clip_ratio_c,
            agg=tr.agg,
        )
        if ref_lp is not None:
            kl = masked_mean(kl_penalty(lp, ref_lp[mb], cfg.actor.kl_type), m)
            loss = loss + cfg.actor.kl_coef * kl
            stats["kl_ref"].append(float(kl.detach()))
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.actor.grad_clip)
        tr.opt.step()
        stats["loss"].append(float(loss.detach()))
        stats["grad_norm"].append(float(gn))
        for k in ("clipfrac", "clipfrac_lower", "approx_kl"):
            stats[k].append(met[k])
    return {k: (float(np.mean(v)) if v else 0.0) for k, v in stats.items()}


def captured_batch(tmp_path, overrides):
    """A trainer after one real step, and the arguments its second step passed to ``_update``."""
    tr = Trainer(load_config(None, [*BASE, *overrides]), Store(tmp_path), log=lambda s: None)
    tr.step(1)  # move off the initial weights so that ratios and clipping are not trivial
    seen = {}
    real = tr._update

    def grab(*args):
        seen["args"] = args
        return real(*args)

    tr._update = grab
    tr.step(2)
    tr._update = real
    return tr, seen["args"]


def run_both(tr, args):
    """(lean stats, lean weights, reference stats, reference weights), from the same start."""
    model0, opt0 = copy.deepcopy(tr.model.state_dict()), copy.deepcopy(tr.opt.state_dict())
    ro, old_lp, adv, ref_lp, _ = args
    lean = tr._update(ro, old_lp, adv, ref_lp, None)
    w_lean = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.model.load_state_dict(model0)
    tr.opt.load_state_dict(opt0)
    ref = reference_update(tr, ro, old_lp, adv, ref_lp)
    return lean, w_lean, ref, tr.model.state_dict()


@pytest.mark.parametrize(
    "overrides",
    [
        ["actor.loss_agg_mode=token-mean"],
        ["actor.loss_agg_mode=seq-mean-token-sum-norm"],
        ["actor.loss_agg_mode=seq-mean-token-mean", "actor.kl_coef=0.05"],
        ["actor.loss_agg_mode=seq-mean-token-sum", "actor.ppo_epochs=2"],
    ],
)
def test_lean_update_equals_reference(tmp_path, overrides):
    tr, args = captured_batch(tmp_path, overrides)
    ro, old_lp, adv, ref_lp, _ = args
    assert (ref_lp is not None) == any("kl_coef" in o for o in overrides)
    # the cut really happens: most mini-batches here are narrower than the batch
    subs = [tr._mini_batch(ro, rows)[1] for rows in torch.arange(adv.shape[0]).chunk(8)]
    assert sum(s.input_ids.shape[1] < ro.input_ids.shape[1] for s in subs) >= 2
    assert any(s.response_ids.shape[1] < ro.response_ids.shape[1] for s in subs)
    assert len({s.prompt_ids.shape[1] for s in subs}) > 1
    assert (adv == 0).all(1).any()  # some rows have no gradient: with the skip on they stay out
    for skip in (False, True):
        tr.cfg.actor.skip_zero_advantage = skip
        lean, w_lean, ref, w_ref = run_both(tr, args)
        assert ref["grad_norm"] > 0 and ref["loss"] != 0
        for k, v in ref.items():
            if not (skip and k == "approx_kl"):  # with the skip: over the rows that ran, by definition
                assert lean[k] == pytest.approx(v, abs=1e-5, rel=1e-5), k
        for k, v in w_ref.items():
            torch.testing.assert_close(w_lean[k], v, atol=1e-5, rtol=0, msg=k)


def test_mini_batch_cut_keeps_every_token(tmp_path):
    tr, (ro, *_rest) = captured_batch(tmp_path, [])
    for rows in torch.arange(ro.response_ids.shape[0]).chunk(8):
        _, sub = tr._mini_batch(ro, rows)
        # every prompt and response token of the rows survives, in the same order
        assert sub.prompt_mask.sum() == ro.prompt_mask[rows].sum()
        assert sub.response_mask.sum() == ro.response_mask[rows].sum()
        for i, r in enumerate(rows.tolist()):
            assert (
                sub.prompt_ids[i][sub.prompt_mask[i].bool()].tolist()
                == ro.prompt_ids[r][ro.prompt_mask[r].bool()].tolist()
            )
            assert (
                sub.response_ids[i][sub.response_mask[i].bool()].tolist()
                == ro.response_ids[r][ro.response_mask[r].bool()].tolist()
            )
        # and nothing is left that all its rows pad
        assert sub.prompt_mask[:, 0].any() and sub.response_mask[:, -1].any()
