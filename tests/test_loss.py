"""Unit tests for engine.update.loss: clipped surrogate, aggregation modes, KL penalties."""

import math

import pytest
import torch

from engine.update.loss import aggregate_loss, kl_penalty, policy_loss


def close(got, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got, expected)


# --------------------------------------------------------------------------------------------
# aggregate_loss
# --------------------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "mode,norm_len,expected",
    [
        ("token-mean", None, 3.0),  # (1+2+3+4+5) / 5
        ("seq-mean-token-sum", None, 7.5),  # (6 + 9) / 2
        ("seq-mean-token-mean", None, 3.25),  # (6/3 + 9/2) / 2 = (2 + 4.5) / 2
        ("seq-mean-token-sum-norm", None, 5.0),  # 15 / T = 15 / 3
        ("seq-mean-token-sum-norm", 5, 3.0),  # 15 / 5
    ],
)
def test_aggregate_loss_modes(mode, norm_len, expected):
    assert aggregate_loss(LOSS, MASK, mode, norm_len).item() == pytest.approx(expected)


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "sum")


# --------------------------------------------------------------------------------------------
# policy_loss on a 2x3 hand example
# --------------------------------------------------------------------------------------------
# token (0,0): ratio 1,               A= 1   -> -1
# token (0,1): ratio e^0.5 = 1.648721, A= 2   -> max(-3.297443, -2*1.28 = -2.56) = -2.56   (clipped)
# token (0,2): ratio e^-0.5 = 0.606531, A=-1  -> max(0.606531, 0.8) = 0.8                (clipped)
# token (1,0): ratio e^3 = 20.085537, A=-1    -> max(20.085537, 1.28) = 20.085537 ; dual min(., 3) = 3
# token (1,1): ratio 1,               A= 0.5 -> -0.5
# token (1,2): padding with huge values
# row sums: -1 - 2.56 + 0.8 = -2.76 ; 3 - 0.5 = 2.5 ; total -0.26
def _example(requires_grad=False):
    old = torch.tensor([[-1.0, -1.0, -1.0], [-4.0, -2.0, 0.0]])
    new = torch.tensor([[-1.0, -0.5, -1.5], [-1.0, -2.0, 1e4]], requires_grad=requires_grad)
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 0.5, 1e3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return new, old, adv, mask


@pytest.mark.parametrize(
    "agg,norm_len,expected",
    [
        ("token-mean", None, -0.052),  # -0.26 / 5
        ("seq-mean-token-sum", None, -0.13),  # (-2.76 + 2.5) / 2
        ("seq-mean-token-mean", None, 0.165),  # (-2.76/3 + 2.5/2) / 2 = (-0.92 + 1.25) / 2
        ("seq-mean-token-sum-norm", None, -0.0866667),  # -0.26 / 3
        ("seq-mean-token-sum-norm", 4, -0.065),  # -0.26 / 4
    ],
)
def test_policy_loss_agg_modes(agg, norm_len, expected):
    new, old, adv, mask = _example()
    loss, _ = policy_loss(new, old, adv, mask, agg=agg, norm_len=norm_len)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_policy_loss_metrics():
    new, old, adv, mask = _example()
    _, m = policy_loss(new, old, adv, mask)
    for key in ("clipfrac", "clipfrac_lower", "approx_kl"):
        assert isinstance(m[key], float)
    # clipped term strictly larger at (0,1) and (0,2): 2 / 5
    assert m["clipfrac"] == pytest.approx(0.4)
    # dual clip binds at (1,0): 1 / 5
    assert m["clipfrac_lower"] == pytest.approx(0.2)
    # old - new on valid tokens: 0, -0.5, 0.5, -3, 0 -> -3 / 5
    assert m["approx_kl"] == pytest.approx(-0.6)


def test_policy_loss_without_dual_clip():
    new, old, adv, mask = _example()
    loss, m = policy_loss(new, old, adv, mask, dual_clip=None, agg="seq-mean-token-sum")
    # (1,0) keeps 20.085537: row sums -2.76 and 20.085537 - 0.5 = 19.585537 -> mean 8.4127685
    assert loss.item() == pytest.approx(8.4127685, abs=1e-4)
    assert m["clipfrac_lower"] == 0.0


def test_policy_loss_gradient_zero_for_clipped_tokens():
    new, old, adv, mask = _example(requires_grad=True)
    loss, _ = policy_loss(new, old, adv, mask, agg="token-mean")
    loss.backward()
    # unclipped: d(-A r)/d logp = -A r, / 5 tokens: (0,0) -1/5 = -0.2 ; (1,1) -0.5/5 = -0.1
    # (0,1), (0,2) clipped, (1,0) dual-clipped, (1,2) padding -> exactly 0
    close(new.grad, [[-0.2, 0.0, 0.0], [0.0, -0.1, 0.0]])
    assert new.grad[0, 1] == 0 and new.grad[0, 2] == 0 and new.grad[1, 0] == 0 and new.grad[1, 2] == 0


def test_policy_loss_clip_high_boundary_asymmetry():
    # ratio e^0.25 = 1.284025 > 1.28 with A > 0: clipped to 1.28 -> loss -1.28 ;
    # the same ratio with a symmetric clip 0.3 is not clipped -> -1.284025
    new = torch.tensor([[0.25]])
    old = torch.zeros(1, 1)
    adv = torch.ones(1, 1)
    mask = torch.ones(1, 1)
    loss, m = policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx(-1.28, abs=1e-6) and m["clipfrac"] == 1.0
    loss, m = policy_loss(new, old, adv, mask, clip_high=0.3)
    assert loss.item() == pytest.approx(-1.2840254, abs=1e-6) and m["clipfrac"] == 0.0
    # ratio e^-0.25 = 0.778801 < 0.8 with A = -2 -> max(1.557602, 1.6) = 1.6
    loss, m = policy_loss(-new, old, -2 * adv, mask)
    assert loss.item() == pytest.approx(1.6, abs=1e-6) and m["clipfrac"] == 1.0
    # dual clip c=3 with A = -2 and ratio e^5 = 148.41: min(296.8, 2 * 3 = 6) = 6
    loss, m = policy_loss(torch.tensor([[5.0]]), old, -2 * adv, mask)
    assert loss.item() == pytest.approx(6.0, abs=1e-6) and m["clipfrac_lower"] == 1.0


def test_policy_loss_padding_contributes_nothing():
    new, old, adv, mask = _example(requires_grad=True)
    loss_a, m_a = policy_loss(new, old, adv, mask, agg="seq-mean-token-sum")
    # change the padding token to other huge values: nothing moves
    new2 = new.detach().clone()
    new2[1, 2] = -1e4
    adv2 = adv.clone()
    adv2[1, 2] = -1e3
    old2 = old.clone()
    old2[1, 2] = 5e3
    loss_b, m_b = policy_loss(new2, old2, adv2, mask, agg="seq-mean-token-sum")
    assert torch.isfinite(loss_a) and torch.isfinite(loss_b)
    assert loss_a.item() == pytest.approx(-0.13, abs=1e-5)
    assert loss_b.item() == pytest.approx(-0.13, abs=1e-5)
    assert m_a == pytest.approx(m_b)
    loss_a.backward()
    assert torch.isfinite(new.grad).all() and new.grad[1, 2] == 0


# --------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------
def test_kl_penalty_hand_values():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-1.5, -1.0, -3.0])
    # d = lp - ref = [0.5, -1, 0]
    close(kl_penalty(lp, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_penalty(lp, ref, "k2"), [0.125, 0.5, 0.0])  # 0.5 d^2
    # ref - lp = [-0.5, 1, 0]: e^-0.5 + 0.5 - 1 = 0.1065307 ; e - 1 - 1 = 0.7182818 ; 0
    close(kl_penalty(lp, ref, "low_var_kl"), [0.1065307, 0.7182818, 0.0])


def test_kl_penalty_low_var_clamped():
    lp = torch.tensor([0.0, 0.0])
    ref = torch.tensor([5.0, -30.0])
    # e^5 - 5 - 1 = 142.41 -> 10 ; e^-30 + 30 - 1 = 29 -> 10
    out = kl_penalty(lp, ref, "low_var_kl")
    close(out, [10.0, 10.0])
    assert torch.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([1e4]), "low_var_kl")).all()


def test_k3_is_never_negative_when_policy_and_reference_nearly_agree():
    # the same log-probs from two kernels differ in the last bits; exp(x) - x - 1 then rounds below 0
    torch.manual_seed(0)
    ref = -torch.rand(64, 32) * 5
    lp = ref + (torch.rand(64, 32) - 0.5) * 1e-6
    k3 = kl_penalty(lp, ref, "low_var_kl")
    assert (k3 >= 0).all() and k3.max() < 1e-11
    naive = torch.exp(ref - lp) - (ref - lp) - 1.0
    assert (naive < 0).any()  # what the clamp at 0 guards against
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([-1.0]), "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
