"""StepBatch: the trainer's typed batch, and DAPO's refills merged across generation rounds."""

import torch

from engine.config import load_config
from engine.rollout.base import Rollouts
from engine.store.store import Store
from engine.train.trainer import StepBatch, Timer, Trainer

PAD = 9


def _round(prompt_w, resp_w, tag, n=2, groups=2, recorded=True):
    """A generation round: ``groups x n`` rows, prompts of width ``prompt_w``, responses ``resp_w``."""
    B = groups * n
    ro = Rollouts(
        torch.full((B, prompt_w), tag),
        torch.ones(B, prompt_w, dtype=torch.long),
        torch.full((B, resp_w), tag),
        torch.ones(B, resp_w, dtype=torch.long),
        torch.zeros(B, dtype=torch.bool),
        torch.full((B, resp_w), -float(tag)) if recorded else None,
        torch.full((B, resp_w), float(tag)) if recorded else None,
    )
    return StepBatch(
        ro,
        [tag * 10 + b // n for b in range(B)],
        [b // n for b in range(B)],
        [f"r{tag}-{b}" for b in range(B)],
        [b % 2 == 0 for b in range(B)],
        [float(b % 2 == 0) for b in range(B)],
    )


def test_groups_then_concat_renumbers_and_pads():
    a, b = _round(3, 2, tag=1), _round(5, 4, tag=2)
    kept = [a.groups(2)[1], b.groups(2)[0]]  # group 1 of round 1, group 0 of round 2
    m = StepBatch.concat(kept, PAD, n=2, rounds=2)
    assert m.group == [0, 0, 1, 1] and m.rounds == 2
    assert m.prompt_idx == [11, 11, 20, 20]
    assert m.texts == ["r1-2", "r1-3", "r2-0", "r2-1"]
    assert m.correct == [True, False, True, False] and m.rewards == [1.0, 0.0, 1.0, 0.0]
    # prompts left-padded to 5, responses right-padded to 4; masks 0 on the padding
    assert m.ro.prompt_ids[0].tolist() == [PAD, PAD, 1, 1, 1] and m.ro.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert m.ro.response_ids[0].tolist() == [1, 1, PAD, PAD] and m.ro.response_mask[0].tolist() == [1, 1, 0, 0]
    assert m.ro.response_ids[2].tolist() == [2, 2, 2, 2]
    assert m.ro.logprobs[0].tolist() == [-1.0, -1.0, 0.0, 0.0] and m.ro.entropy[3].tolist() == [2.0] * 4
    assert m.polarity.tolist() == [1, -1, 1, -1] and m.polarity.dtype == torch.int8


def test_concat_drops_recorded_values_unless_every_round_has_them():
    m = StepBatch.concat([_round(2, 2, 1), _round(2, 3, 2, recorded=False)], PAD, n=2, rounds=2)
    assert m.ro.logprobs is None and m.ro.entropy is None
    assert m.ro.response_ids.shape == (8, 3)


def test_dynamic_sampling_keeps_only_mixed_groups(tmp_path):
    """DAPO on the embedded model: every kept group has both a correct and a wrong response, or the
    step used up its rounds; rounds are counted and groups renumbered."""
    cfg = load_config(
        None,
        [
            "algorithm.name=dapo",
            "algorithm.max_gen_batches=3",
            "train.prompts_per_step=4",
            "rollout.n=4",
            "rollout.max_new_tokens=24",
            "eval.n_prompts=2",
            "train.threads=1",
        ],
    )
    tr = Trainer(cfg, Store(tmp_path / "runs"))
    batch = tr.sample(1, Timer())
    B = len(batch.texts)
    assert B % 4 == 0 and B <= 16 and 1 <= batch.rounds <= 3
    assert batch.group == [b // 4 for b in range(B)]
    assert batch.ro.response_ids.shape[0] == B == len(batch.prompt_idx)
    mixed = [len(set(batch.rewards[g : g + 4])) > 1 for g in range(0, B, 4)]
    assert all(mixed) or batch.rounds == 3
    if batch.rounds == 1:  # the first round filled the batch: nothing was dropped
        assert B == 16
