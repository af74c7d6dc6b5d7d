"""Unit tests for engine.train.evaluate: the unbiased pass@k estimator and evaluate() on a scripted backend."""

from math import comb

import pytest
import torch

from engine.model.policy import resolve_model_path
from engine.rollout.base import Rollouts
from engine.tasks.problems import Problem
from engine.train.evaluate import encode_prompts, evaluate, pass_at_k


# ------------------------------------------------------------------ pass@k
@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),  # 1 - C(3,1)/C(4,1) = 1 - 3/4
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 0, 1, 0.0),  # 1 - C(4,k)/C(4,k) = 0 for every k
        (4, 0, 2, 0.0),
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),  # n - c = 0 < k
        (4, 3, 2, 1.0),  # n - c = 1 < 2: every pair holds a correct sample
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.9166667
        (8, 2, 1, 0.25),  # pass@1 = c / n
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_value_uses_binomials():
    assert comb(7, 5) == 21 and comb(10, 5) == 252
    assert pass_at_k(10, 3, 5) == pytest.approx(0.9166666667, abs=1e-9)


def test_pass_at_k_k_larger_than_n_raises():
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(4, 2, 5)


@pytest.mark.parametrize("c", [0, 1, 3, 7, 10])
def test_pass_at_k_monotone_in_k(c):
    vals = [pass_at_k(10, c, k) for k in range(1, 11)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
    assert all(0.0 <= v <= 1.0 for v in vals)


# ------------------------------------------------------------------ evaluate() on a scripted backend
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny"))
    t.padding_side = "left"
    return t


PROBLEMS = [Problem("1+1=", "2"), Problem("2+3=", "5"), Problem("9-4=", "5")]
# greedy: P0 right, P1 wrong, P2 right -> greedy_acc 2/3
GREEDY = {0: "1+1=2;\\boxed{2}", 1: "2+3=6;\\boxed{6}", 2: "9-4=5;\\boxed{5}"}
# 4 samples each: P0 4/4 right, P1 1/4 right, P2 0/4 right
SAMPLED = {
    0: ["1+1=2;\\boxed{2}", "\\boxed{2}", "1+1=2;\\boxed{2}", "x=2;\\boxed{2}"],
    1: ["\\boxed{6}", "2+3=5", "\\boxed{5}", "\\boxed{4}"],  # "2+3=5" has no box: wrong
    2: ["\\boxed{4}", "\\boxed{6}", "9-4=3;\\boxed{3}", "\\boxed{15}"],
}
# text stored after the EOS with mask 0: a decoder that ignored the mask would see a right answer
HIDDEN_TAIL = "\\boxed{5}"


class ScriptedBackend:
    """Returns fixed responses per prompt; records each call's sampling parameters."""

    def __init__(self, tok, problems, hidden_tail=False):
        self.tok = tok
        self.index = {tuple(p): i for i, p in enumerate(encode_prompts(tok, problems))}
        self.hidden_tail = hidden_tail
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.temperature, params.max_new_tokens, params.seed))
        rows, masks = [], []
        for p in prompts:
            i = self.index[tuple(p)]
            texts = [GREEDY[i]] * params.n if params.temperature == 0 else SAMPLED[i][: params.n]
            assert len(texts) == params.n
            for t in texts:
                ids = self.tok.encode(t, add_special_tokens=False) + [self.tok.eos_token_id]
                tail = self.tok.encode(HIDDEN_TAIL, add_special_tokens=False) if self.hidden_tail else []
                rows.append(ids + tail)
                masks.append([1] * len(ids) + [0] * len(tail))
        T = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        rid = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        rmask = torch.tensor([m + [0] * (T - len(m)) for m in masks])
        B = len(rows)
        pid = torch.ones(B, 1, dtype=torch.long)
        return Rollouts(pid, torch.ones_like(pid), rid, rmask, torch.zeros(B, dtype=torch.bool))


def test_scripted_texts_round_trip(tok):
    ids = tok.encode("1+1=2;\\boxed{2}", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "1+1=2;\\boxed{2}"


def test_evaluate_exact_metrics(tok):
    be = ScriptedBackend(tok, PROBLEMS)
    res = evaluate(be, tok, PROBLEMS, ks=(1, 2, 4), temperature=0.7, max_new_tokens=20, seed=3)
    assert res["greedy_acc"] == pytest.approx(2 / 3)
    # (4 + 1 + 0) / (3 * 4) = 5/12
    assert res["sampled_acc"] == pytest.approx(5 / 12)
    # pass@1: (1 + 1/4 + 0) / 3 = 0.4166667
    # pass@2: P1: 1 - C(3,2)/C(4,2) = 0.5 -> (1 + 0.5 + 0) / 3 = 0.5
    # pass@4: P1: 1 -> (1 + 1 + 0) / 3 = 2/3
    assert set(res["pass@k"]) == {1, 2, 4}
    assert res["pass@k"][1] == pytest.approx(1.25 / 3)
    assert res["pass@k"][2] == pytest.approx(0.5)
    assert res["pass@k"][4] == pytest.approx(2 / 3)
    assert res["n_prompts"] == 3 and res["n_samples"] == 4
    # one greedy call (n=1, temperature 0) then one sampled call (n = max k, given temperature)
    assert [c[:4] for c in be.calls] == [(3, 1, 0.0, 20), (3, 4, 0.7, 20)]


def test_evaluate_ignores_tokens_outside_the_mask(tok):
    res = evaluate(ScriptedBackend(tok, PROBLEMS, hidden_tail=True), tok, PROBLEMS, ks=(1, 2, 4))
    assert res["greedy_acc"] == pytest.approx(2 / 3)
    assert res["sampled_acc"] == pytest.approx(5 / 12)


def test_evaluate_in_prompt_batches_gives_same_result(tok):
    whole = evaluate(ScriptedBackend(tok, PROBLEMS), tok, PROBLEMS, ks=(1, 2, 4))
    be = ScriptedBackend(tok, PROBLEMS)
    chunked = evaluate(be, tok, PROBLEMS, ks=(1, 2, 4), batch_prompts=2)
    assert chunked == whole
    # 3 prompts in chunks of 2: greedy+sampled for [P0, P1], then for [P2]
    assert [(c[0], c[1]) for c in be.calls] == [(2, 1), (2, 4), (1, 1), (1, 4)]


def test_evaluate_single_k(tok):
    # ks=(2,): n = 2 samples, the first two of each script
    # counts: P0 2/2, P1 0/2 ("\\boxed{6}", "2+3=5"), P2 0/2
    res = evaluate(ScriptedBackend(tok, PROBLEMS), tok, PROBLEMS, ks=(2,))
    assert res["n_samples"] == 2
    assert res["sampled_acc"] == pytest.approx(2 / 6)
    assert res["pass@k"] == {2: pytest.approx(1 / 3)}
