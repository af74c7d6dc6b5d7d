"""Unit tests for engine.rollout (EOS cutting, padding, position ids, the HF backend) and policy loading errors."""

import pytest
import torch

from engine.model.policy import ModelError, load_policy
from engine.rollout.base import SamplingParams, cut_at_eos, left_pad, position_ids
from engine.rollout.hf import HFBackend
from engine.tasks.problems import Problem
from engine.train.evaluate import encode_prompts

EOS, PAD = 2, 0


# ------------------------------------------------------------------ cut_at_eos
def test_cut_at_eos_keeps_first_eos_and_pads_the_rest():
    gen = torch.tensor(
        [
            [5, 6, EOS, 7, EOS],  # first EOS at 2 -> keep 3 tokens; the 7 and the 2nd EOS become pad
            [8, 9, 10, 11, 12],  # no EOS -> truncated, all 5 kept
            [EOS, 4, 4, 4, 4],  # EOS first -> keep 1 token
        ]
    )
    ids, mask, trunc = cut_at_eos(gen, EOS, PAD)
    assert ids.tolist() == [[5, 6, EOS, PAD, PAD], [8, 9, 10, 11, 12], [EOS, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


def test_cut_at_eos_trims_to_longest_kept_row():
    gen = torch.tensor(
        [
            [5, EOS, 7, 7, 7, 7],  # kept length 2
            [6, 6, EOS, 9, 9, 9],  # kept length 3 -> result has 3 columns
        ]
    )
    ids, mask, trunc = cut_at_eos(gen, EOS, PAD)
    assert ids.tolist() == [[5, EOS, PAD], [6, 6, EOS]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert trunc.tolist() == [False, False]


def test_cut_at_eos_all_rows_stop_immediately():
    ids, mask, trunc = cut_at_eos(torch.tensor([[EOS, 3, 3], [EOS, EOS, 4]]), EOS, PAD)
    assert ids.tolist() == [[EOS], [EOS]] and mask.tolist() == [[1], [1]]
    assert not trunc.any()


def test_cut_at_eos_does_not_modify_input():
    gen = torch.tensor([[5, EOS, 7]])
    cut_at_eos(gen, EOS, PAD)
    assert gen.tolist() == [[5, EOS, 7]]


# ------------------------------------------------------------------ left_pad / position_ids
def test_left_pad_aligns_right():
    ids, mask = left_pad([[1, 2, 3], [4], []], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_left_pad_all_empty_has_one_column():
    ids, mask = left_pad([[], []], pad_id=7)
    assert ids.tolist() == [[7], [7]] and mask.tolist() == [[0], [0]]


def test_position_ids_left_padded():
    # row 0: cumsum [0,0,1,2,3] - 1 = [-1,-1,0,1,2] -> clamp -> [0,0,0,1,2]
    # row 1: no padding -> 0..4
    # row 2: prompt + response with a right pad: cumsum [0,1,2,3,3] - 1 -> [0,0,1,2,2]
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert position_ids(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]


# ------------------------------------------------------------------ HFBackend on the shipped model
@pytest.fixture(scope="module")
def policy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    yield model, tok
    torch.set_num_threads(threads)


PROBLEMS = [Problem("1+2+3=", "6"), Problem("12+34-56=", "-10")]


def _generate(policy, **kw):
    model, tok = policy
    prompts = encode_prompts(tok, PROBLEMS)
    return prompts, HFBackend(model, tok).generate(prompts, SamplingParams(**kw))


def test_encode_prompts_prepends_bos(policy):
    _, tok = policy
    prompts = encode_prompts(tok, PROBLEMS)
    # char-level tokenizer: BOS + one id per character
    assert [len(p) for p in prompts] == [1 + 6, 1 + 9]
    assert prompts[0][0] == tok.bos_token_id
    assert tok.decode(prompts[1][1:]) == "12+34-56="


def test_hf_generate_sampling_is_deterministic_in_seed(policy):
    _, a = _generate(policy, n=3, temperature=1.0, seed=5, max_new_tokens=40)
    _, b = _generate(policy, n=3, temperature=1.0, seed=5, max_new_tokens=40)
    for x, y in zip(
        (a.prompt_ids, a.prompt_mask, a.response_ids, a.response_mask, a.truncated),
        (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.truncated),
    ):
        assert torch.equal(x, y)


def test_hf_generate_greedy_is_deterministic_and_equal_across_samples(policy):
    _, a = _generate(policy, n=3, temperature=0.0, seed=1, max_new_tokens=40)
    _, b = _generate(policy, n=3, temperature=0.0, seed=2, max_new_tokens=40)  # seed is irrelevant for greedy
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    # greedy: the 3 samples of one prompt are the same sequence
    for p in range(2):
        rows = a.response_ids[3 * p : 3 * p + 3]
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


def test_hf_generate_layout_and_eos(policy):
    model, tok = policy
    prompts, ro = _generate(policy, n=3, temperature=1.0, seed=5, max_new_tokens=40)
    B = 2 * 3
    assert ro.prompt_ids.shape == (B, 10) and ro.prompt_mask.shape == (B, 10)  # longest prompt: 10 ids
    assert ro.response_ids.shape[0] == B and ro.response_mask.shape == ro.response_ids.shape
    assert ro.response_ids.shape[1] <= 40 and ro.truncated.shape == (B,)
    # prompt-major order, left padded: rows 0-2 are prompt 0 (3 pads), rows 3-5 prompt 1
    p0 = [tok.pad_token_id] * 3 + prompts[0]
    for r in range(B):
        expected = p0 if r < 3 else prompts[1]
        assert ro.prompt_ids[r].tolist() == expected
        assert ro.prompt_mask[r].tolist() == ([0] * 3 + [1] * 7 if r < 3 else [1] * 10)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for r in range(B):
        m = ro.response_mask[r].bool()
        L = int(m.sum())
        assert m[:L].all() and not m[L:].any(), "mask must be a prefix"
        kept = ro.response_ids[r, :L].tolist()
        assert (ro.response_ids[r, L:] == pad).all()
        if ro.truncated[r]:
            assert eos not in kept and L == ro.response_ids.shape[1]
        else:
            assert kept[-1] == eos and eos not in kept[:-1]
    # the result is trimmed to the longest kept row
    assert int(ro.response_mask.sum(1).max()) == ro.response_ids.shape[1]
    # input_ids / attention_mask concatenate prompt and response
    assert torch.equal(ro.input_ids[:, :10], ro.prompt_ids) and torch.equal(ro.attention_mask[:, 10:], ro.response_mask)


def test_hf_generate_budget_too_short_marks_truncated(policy):
    # the shipped model's solutions are ~25 characters: 8 new tokens never reach EOS
    _, tok = policy
    _, ro = _generate(policy, n=2, temperature=1.0, seed=3, max_new_tokens=8)
    assert ro.response_ids.shape == (4, 8)
    assert ro.truncated.tolist() == [True] * 4
    assert ro.response_mask.tolist() == [[1] * 8] * 4
    assert not (ro.response_ids == tok.eos_token_id).any()


def test_hf_generate_restores_train_mode(policy):
    model, _ = policy
    model.train()
    try:
        _generate(policy, n=1, temperature=0.0, max_new_tokens=4)
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------------ load_policy errors
def test_load_policy_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError) as e:
        load_policy(str(tmp_path), device="cpu")
    msg = str(e.value)
    assert "config.json" in msg and str(tmp_path) in msg and "\n" not in msg


def test_load_policy_missing_absolute_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as e:
        load_policy(str(missing), device="cpu")
    msg = str(e.value)
    assert str(missing) in msg and "\n" not in msg


def test_load_policy_unknown_builtin():
    with pytest.raises(ModelError) as e:
        load_policy("builtin:huge", device="cpu")
    assert "builtin:tiny" in str(e.value) and "\n" not in str(e.value)


def test_concat_keeps_sampler_logprobs_without_entropies():
    """vLLM records log-probs but no entropies: a concatenation (dynamic sampling's rounds) keeps the log-probs."""
    from engine.rollout.base import Rollouts

    def part(T, lp):
        ids = torch.ones(1, T, dtype=torch.long)
        return Rollouts(ids[:, :1], ids[:, :1], ids, ids, torch.tensor([False]), torch.full((1, T), lp), None)

    both = Rollouts.concat([part(2, -0.5), part(3, -0.25)], pad_id=0)
    assert both.entropy is None
    assert both.logprobs.tolist() == [[-0.5, -0.5, 0.0], [-0.25, -0.25, -0.25]]
    mixed = Rollouts.concat([part(2, -0.5), Rollouts(*part(2, -0.5)._tensors()[:5])], pad_id=0)
    assert mixed.logprobs is None  # one part without: none
