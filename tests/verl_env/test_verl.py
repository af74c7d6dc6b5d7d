"""verl integration, run in verl's own environment (verl pins transformers<5.11): `make test-verl`."""

import importlib

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from engine.advantage import a3po_rules, token_shaping  # noqa: E402
from engine.loss import policy_loss  # noqa: E402


def _batch():
    torch.manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.5, -0.5, -0.5, 0.0]).unsqueeze(-1) * mask
    old = -torch.rand(B, T) * 2
    new = (old + 0.1 * torch.randn(B, T)).requires_grad_()
    return old, new, adv, mask


def _config():
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                       rollout_n=1)


def test_registered_through_external_modules(monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "engine.integrations.verl")
    from verl.utils.import_utils import import_external_libs

    import_external_libs("engine.integrations.verl")
    from engine.integrations import verl as ours

    for name in ("a3po", "a3po_static", "psr", "nsr", "p2n1", "token_weighted"):
        assert get_policy_loss_fn(name) is ours.LOSSES[name]


def test_a3po_loss_equals_engine_shaped_loss(monkeypatch):
    importlib.import_module("engine.integrations.verl")
    monkeypatch.setenv("A3PO_ALPHA_POS", "3")
    monkeypatch.setenv("A3PO_ALPHA_NEG", "2")
    monkeypatch.setenv("A3PO_DECAY", "constant")
    old, new, adv, mask = _batch()
    loss, metrics = get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    pol = torch.tensor([1, -1, -1, 0])
    shaped, key = token_shaping(adv, mask, pol, a3po_rules(0, 10, alpha_pos=3.0, alpha_neg=2.0, decay="constant"), logprobs=old)
    ref, _ = policy_loss(new, old, shaped, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")
    assert torch.allclose(loss, ref, atol=1e-6)
    assert metrics["a3po/key_frac"] > 0
    g1 = torch.autograd.grad(loss, new, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, new)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_psr_drops_negative_rows():
    importlib.import_module("engine.integrations.verl")
    old, new, adv, mask = _batch()
    loss, _ = get_policy_loss_fn("psr")(old, new, adv, mask.bool(), "token-mean", _config())
    (g,) = torch.autograd.grad(loss, new)
    assert g[1].abs().sum() == 0 and g[2].abs().sum() == 0 and g[0].abs().sum() > 0


def test_log_verl_batch_writes_store_rows(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer
    from verl import DataProto

    from conftest import ROOT
    from engine.integrations.verl import log_verl_batch
    from engine.store import Store

    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-model")
    old, _, adv, mask = _batch()
    ids = torch.tensor([tok.encode("12+3=15", add_special_tokens=False)[:6]] * 4)
    scores = torch.zeros(4, 6)
    scores[0, 5] = 1.0
    batch = DataProto.from_dict(tensors={"responses": ids, "response_mask": mask, "old_log_probs": old, "advantages": adv,
                                         "token_level_scores": scores},
                                non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)})
    store = Store(tmp_path)
    rid = store.create_run({"algorithm": {"name": "a3po"}, "integration": "verl"}, name="verl-run")
    n = log_verl_batch(store, rid, 1, batch, tok)
    assert n == int(mask.sum())
    t = store.query("select rollout_idx, position, token_text, is_key, polarity from tokens order by rollout_idx, position")
    assert len(t) == n and t.is_key.any()
    r = store.query("select rollout_idx, group_idx, polarity, reward from rollouts order by rollout_idx")
    assert r.group_idx.tolist() == [0, 0, 1, 1] and r.polarity.tolist() == [1, -1, -1, 0] and r.reward.tolist()[0] == 1.0
    assert "".join(t[t.rollout_idx == 0].token_text) == "12+3=1"
