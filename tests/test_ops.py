"""Unit tests for engine.model.ops: chunked token log-probs and entropies."""

import math

import torch

from engine.model.ops import token_entropy, token_logprobs, token_logprobs_entropy

LOG2 = 0.6931472
LOG4 = 1.3862944


def close(got, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got, expected)


def test_uniform_logits_hand_values():
    logits = torch.zeros(3, 4)  # uniform over V=4
    close(token_logprobs(logits, torch.tensor([0, 2, 3])), [-LOG4] * 3)  # log(1/4)
    close(token_entropy(logits), [LOG4] * 3)  # -4 * 1/4 log(1/4) = log 4


def test_non_uniform_hand_values():
    # logits log([1, 2, 3, 4]) -> p = [0.1, 0.2, 0.3, 0.4]
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])) + 7.0  # a shift changes nothing
    close(token_logprobs(logits, torch.tensor([3])), [-0.9162907])  # log 0.4
    close(token_logprobs(logits, torch.tensor([0])), [-2.3025851])  # log 0.1
    # H = 0.1*2.302585 + 0.2*1.609438 + 0.3*1.203973 + 0.4*0.916291 = 1.2798542
    close(token_entropy(logits), [1.2798542])


def test_extreme_logits_are_stable():
    logits = torch.tensor([[1e4, -1e4, 0.0, 0.0], [-1e4, -1e4, -1e4, -1e4]])
    lp = token_logprobs(logits, torch.tensor([0, 2]))
    ent = token_entropy(logits)
    assert not torch.isnan(lp).any() and not torch.isnan(ent).any()
    # row 0 is one-hot on token 0 -> log p = 0, entropy 0 ; row 1 uniform -> -log 4, log 4
    # (float32 spacing near 1e4 is ~1e-3, so row 1 is only that exact)
    close(lp, [0.0, -LOG4], atol=2e-3)
    close(ent, [0.0, LOG4], atol=2e-3)
    # log p of a token 2e4 below the max is -2e4 (finite)
    close(token_logprobs(logits[:1], torch.tensor([1])), [-2e4], atol=1e-2)


def test_neg_inf_logits_give_no_nan():
    inf = math.inf
    logits = torch.tensor([[0.0, -inf, 0.0, -inf], [-inf, 3.0, -inf, -inf]])
    lp = token_logprobs(logits, torch.tensor([0, 1]))
    ent = token_entropy(logits)
    # row 0: two live tokens -> -log 2, entropy log 2 ; row 1: one live token -> 0, entropy 0
    close(lp, [-LOG2, 0.0])
    close(ent, [LOG2, 0.0])
    # a masked label has log-prob -inf, not nan
    masked = token_logprobs(logits[:1], torch.tensor([1]))
    assert not torch.isnan(masked).any() and masked.item() == -inf


def test_neg_inf_logits_gradients_are_finite():
    inf = math.inf
    base = torch.tensor([[0.0, -inf, 0.0, -inf]])
    x = base.clone().requires_grad_(True)
    token_logprobs(x, torch.tensor([0])).sum().backward()
    # d log p_0 / d z_j = 1[j=0] - p_j with p = [0.5, 0, 0.5, 0]
    close(x.grad, [[0.5, 0.0, -0.5, 0.0]])
    x = base.clone().requires_grad_(True)
    token_entropy(x).sum().backward()
    # dH/dz_j = -p_j (log p_j + H) = -0.5 (-log 2 + log 2) = 0 on live tokens ; 0 on masked ones
    assert not torch.isnan(x.grad).any(), x.grad
    close(x.grad, [[0.0, 0.0, 0.0, 0.0]])


def test_bfloat16_in_bfloat16_out():
    logits = torch.zeros(2, 4, dtype=torch.bfloat16)
    lp = token_logprobs(logits, torch.tensor([1, 3]))
    ent = token_entropy(logits)
    assert lp.dtype == torch.bfloat16 and ent.dtype == torch.bfloat16
    # bf16 has ~3 significant digits
    close(lp.float(), [-LOG4, -LOG4], atol=1e-2)
    close(ent.float(), [LOG4, LOG4], atol=1e-2)
    big = torch.tensor([[1e4, -1e4, 0.0, 0.0]], dtype=torch.bfloat16)
    assert token_logprobs(big, torch.tensor([0])).dtype == torch.bfloat16
    assert not torch.isnan(token_entropy(big)).any()
    assert torch.float64 == token_entropy(torch.zeros(1, 4, dtype=torch.float64)).dtype


def test_leading_shape_preserved_and_chunking_identical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g) * 5
    labels = torch.randint(0, 7, (2, 3), generator=g)
    lp_small = token_logprobs(logits, labels, chunk_size=3)
    lp_big = token_logprobs(logits, labels, chunk_size=4096)
    ent_small = token_entropy(logits, chunk_size=3)
    ent_big = token_entropy(logits, chunk_size=4096)
    assert lp_small.shape == (2, 3) and ent_small.shape == (2, 3)
    assert torch.equal(lp_small, lp_big)
    assert torch.equal(ent_small, ent_big)
    # chunk size 1 and a size that does not divide the 6 rows
    assert torch.equal(token_logprobs(logits, labels, chunk_size=1), lp_big)
    assert torch.equal(token_entropy(logits, chunk_size=4), ent_big)
    # bf16 chunking is identical too
    lb = logits.to(torch.bfloat16)
    assert torch.equal(token_logprobs(lb, labels, chunk_size=3), token_logprobs(lb, labels, chunk_size=4096))
    assert torch.equal(token_entropy(lb, chunk_size=3), token_entropy(lb, chunk_size=4096))


def test_leading_shape_hand_values():
    # (2, 3, 4) of zeros -> every entry -log 4 / log 4, shape (2, 3)
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [3, 2, 1]])
    close(token_logprobs(logits, labels, chunk_size=3), [[-LOG4] * 3] * 2)
    close(token_entropy(logits, chunk_size=3), [[LOG4] * 3] * 2)


def test_gradients_flow_hand_values():
    x = torch.zeros(1, 4, requires_grad=True)
    token_logprobs(x, torch.tensor([2])).sum().backward()
    # 1[j=2] - 1/4
    close(x.grad, [[-0.25, -0.25, 0.75, -0.25]])

    x = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).requires_grad_(True)
    token_entropy(x, chunk_size=1).sum().backward()
    # dH/dz_j = -p_j (log p_j + H), H = 1.2798542:
    #  0.1: -0.1 (-2.3025851 + 1.2798542) = 0.1022731
    #  0.2: -0.2 (-1.6094379 + 1.2798542) = 0.0659167
    #  0.3: -0.3 (-1.2039728 + 1.2798542) = -0.0227644
    #  0.4: -0.4 (-0.9162907 + 1.2798542) = -0.1454254
    close(x.grad, [[0.1022731, 0.0659167, -0.0227644, -0.1454254]])


def test_gradients_flow_through_chunks_and_bf16():
    x = torch.zeros(2, 3, 4, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    token_logprobs(x, labels, chunk_size=2).sum().backward()
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]).expand(2, 3, 4)
    close(x.grad, expected)
    xb = torch.zeros(2, 4, dtype=torch.bfloat16, requires_grad=True)
    token_logprobs(xb, torch.tensor([0, 1])).sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16
    close(xb.grad.float(), [[0.75, -0.25, -0.25, -0.25], [-0.25, 0.75, -0.25, -0.25]], atol=1e-2)


# ------------------------------------------------------------------ fused pass and response-only mask
def test_fused_pass_equals_the_two_functions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    logits[0, 1, :5] = -math.inf  # a row with masked vocabulary entries
    labels = torch.randint(5, 11, (3, 5), generator=g)
    for chunk in (1, 4, 1024):
        lp, ent = token_logprobs_entropy(logits, labels, chunk_size=chunk)
        close(lp, token_logprobs(logits, labels), atol=1e-6)
        close(ent, token_entropy(logits), atol=1e-6)
    # hand values: p = [0.1, 0.2, 0.3, 0.4] -> log p of token 3 = log 0.4, H = 1.2798542
    lp, ent = token_logprobs_entropy(torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), torch.tensor([3]))
    close(lp, [-0.9162907])
    close(ent, [1.2798542])
    lb, eb = token_logprobs_entropy(logits.bfloat16(), labels)
    assert lb.dtype == eb.dtype == torch.bfloat16


def test_fused_pass_gradients_equal_the_two_functions():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 9, generator=g) * 3
    labels = torch.randint(0, 9, (4,), generator=g)
    w = torch.randn(4, generator=g)  # weights so that the two outputs' gradients do not cancel
    x1 = base.clone().requires_grad_(True)
    lp, ent = token_logprobs_entropy(x1, labels, chunk_size=3)
    (lp.sum() + (w * ent).sum()).backward()
    x2 = base.clone().requires_grad_(True)
    (token_logprobs(x2, labels).sum() + (w * token_entropy(x2)).sum()).backward()
    close(x1.grad, x2.grad, atol=1e-6)


def test_mask_computes_response_positions_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, generator=g) * 3
    labels = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    full_lp, full_ent = token_logprobs(logits, labels), token_entropy(logits)
    for chunk in (1, 2, 1024):
        lp = token_logprobs(logits, labels, chunk_size=chunk, mask=mask)
        ent = token_entropy(logits, chunk_size=chunk, mask=mask)
        lp2, ent2 = token_logprobs_entropy(logits, labels, chunk_size=chunk, mask=mask)
        for got, full in ((lp, full_lp), (ent, full_ent), (lp2, full_lp), (ent2, full_ent)):
            assert got.shape == (2, 4)
            close(got[mask.bool()], full[mask.bool()], atol=1e-6)  # response tokens: the same numbers
            assert torch.equal(got[~mask.bool()], torch.zeros(4))  # padding: exactly 0, never computed
    # hand values on uniform logits: -log 4 / log 4 where the mask is set, 0 elsewhere
    u = token_logprobs(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]), mask=torch.tensor([[1, 0, 1]]))
    close(u, [[-LOG4, 0.0, -LOG4]])
    # an empty mask gives all zeros of the right shape
    assert torch.equal(token_entropy(logits, mask=torch.zeros(2, 4)), torch.zeros(2, 4))


def test_mask_padding_gets_no_gradient():
    x = torch.zeros(1, 3, 4, requires_grad=True)
    token_logprobs(x, torch.tensor([[2, 2, 2]]), mask=torch.tensor([[1, 1, 0]])).sum().backward()
    # 1[j=2] - 1/4 on the two response positions, nothing on the padded one
    row = [-0.25, -0.25, 0.75, -0.25]
    close(x.grad, [[row, row, [0.0] * 4]])


def test_mask_shape_must_match():
    try:
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 2))
    except ValueError as e:
        assert "does not match" in str(e)
    else:
        raise AssertionError("a mask of the wrong shape was accepted")
