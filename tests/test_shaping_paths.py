"""One batch, every path, one answer: the trainer, the replay (the playground's engine), TRL and
verl all shape advantages with ``engine.shaping.algorithms.shape_tokens`` and one ``ResolvedAlgorithm``.

The batch is a real training step of the embedded model (A3PO mid-decay, asymmetric alphas, an extra
prob-based token rule on top), taken at step 3 of 4 so the decay is neither at its start nor its end.
"""

import pytest
import torch

from engine.config import load_config
from engine.shaping.algorithms import resolve
from engine.shaping.replay import replay, to_batch
from engine.store.store import Store
from engine.train.trainer import Trainer

STEP = 3  # stored step 3 is shaped at 2 finished steps: alpha(2 of 4) = 1 + (alpha0 - 1) / 2
OVERRIDES = [
    "model.path=builtin:tiny-countdown",
    "data.train=builtin:countdown",
    "data.test=builtin:countdown",
    "algorithm.name=a3po",
    "algorithm.alpha_pos=3",
    "algorithm.alpha_neg=1.5",
    "algorithm.ratio=0.25",
    "algorithm.token_rules=[{polarity: negative, metric: prob, end: low, ratio: 0.3, scale: 0.5}]",
    "train.steps=4",
    "train.prompts_per_step=6",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "eval.n_prompts=2",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def step_batch(tmp_path_factory):
    """A real trainer step: its config, resolved algorithm and the tables it stored."""
    cfg = load_config(None, OVERRIDES)
    tr = Trainer(cfg, Store(tmp_path_factory.mktemp("runs")))
    _, tables = tr.step(STEP)
    batch = to_batch(tables["rollouts"].to_pandas(), tables["tokens"].to_pandas())
    return cfg, tr.resolved, batch


def test_the_trainer_stored_what_shape_tokens_gives(step_batch):
    cfg, resolved, batch = step_batch
    assert resolved == resolve(cfg)
    assert resolved.decay_steps == 4 and (resolved.alpha_pos, resolved.alpha_neg) == (3.0, 1.5)
    m = batch.mask.bool()
    assert m.sum() > 0 and batch.stored_key[m].any()
    # the decay is mid-way, so shaped != raw on key tokens: the comparison below can fail
    assert not torch.equal(batch.stored_adv, batch.stored_adv_raw)


def test_replay_reproduces_the_trainers_shaping(step_batch):
    cfg, resolved, batch = step_batch
    shaped = replay(batch, resolved, step=STEP - 1)
    assert (shaped.alpha_pos, shaped.alpha_neg) == (2.0, 1.25)
    assert torch.equal(shaped.adv, batch.stored_adv)
    assert torch.equal(shaped.key_mask, batch.stored_key)
    assert torch.equal(shaped.adv_tokens_raw, batch.stored_adv_raw)


def test_trl_shapes_the_batch_identically(step_batch, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from engine.integrations.trl import A3POGRPOTrainer
    from engine.model.policy import load_policy

    cfg, resolved, batch = step_batch
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    a = cfg.algorithm
    tr = A3POGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=trl.GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=32,
            max_steps=4,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 8),
        processing_class=tok,
        a3po={
            "alpha_pos": a.alpha_pos,
            "alpha_neg": a.alpha_neg,
            "ratio": a.ratio,
            "token_rules": a.token_rules,
        },
    )
    assert tr.a3po_resolved() == resolved  # TRL's options resolve to the very same algorithm
    raw = replay(batch, resolved, step=STEP - 1).adv_raw  # TRL hands the (B,) group advantage
    shaped = tr.a3po_shape(raw, batch.polarity, batch.mask, batch.logprobs, batch.entropy, STEP - 1)
    assert torch.equal(shaped.adv, batch.stored_adv)
    assert torch.equal(shaped.key_mask, batch.stored_key)


def test_verl_loss_shapes_the_batch_identically(step_batch):
    """The verl loss's shaping (verl-free half): the resolved algorithm travels to the workers as one
    JSON environment variable, verl hands the loss (B, T) advantages and no entropies, and polarity is
    the sign of the advantage. Where the advantage is non-zero the result is the trainer's, bit for bit."""
    from engine.integrations.verl_records import RESOLVED_ENV, resolved_env, resolved_from_env, shape

    cfg, resolved, batch = step_batch
    worker = resolved_from_env({RESOLVED_ENV: resolved_env(resolved)})
    assert worker == resolved
    raw = replay(batch, resolved, step=STEP - 1).adv_tokens_raw  # verl's GRPO advantage, broadcast (B, T)
    shaped = shape(worker, raw, batch.mask, batch.logprobs, STEP - 1)
    assert torch.equal(shaped.adv, batch.stored_adv)
    signed = shaped.adv_raw != 0  # all-equal groups: polarity 0 in verl, -1 in the trainer; no advantage either way
    assert signed.any() and torch.equal(shaped.key_mask[signed], batch.stored_key[signed])
