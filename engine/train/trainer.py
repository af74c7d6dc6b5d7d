"""The RLVR training loop: sample, score, shape, update, store.

One step: sample ``rollout.n`` responses for each of ``train.prompts_per_step`` prompts, score them
with the verifier, compute old-policy log-probs and entropies in one forward pass, turn scores into
per-token advantages with the configured algorithm (``engine.shaping.algorithms``), update the policy with
the clipped surrogate (``engine.update.loss``), and write the step's metrics, rollouts and tokens to the
store as one atomic segment.

    a3po train --config configs/demo.yaml            # the demo: A3PO on the embedded model
    a3po train --resume <run_id>                     # continue a killed run from its checkpoint

When the update is a single on-policy mini-batch (``ppo_epochs=1, mini_batches=1``) the forward
pass that computes the loss also provides the old log-probs (detached) and the entropies, so
shaping and per-token logging cost no extra forward pass. With the update split between CPU rollout
workers (``actor.split_update``, engine/update/shares.py) the kv engine's recorded log-probs serve instead.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from engine.config import Config, config_from_dict
from engine.model import fast_forward
from engine.model.ops import token_logprobs, token_logprobs_entropy
from engine.model.policy import load_policy
from engine.rollout.base import Rollouts, SamplingParams
from engine.rollout.registry import make_backend
from engine.shaping.advantage import gradient_push
from engine.shaping.algorithms import resolve, shape_advantages
from engine.store.schema import evals_table, mismatch_metrics, step_tables
from engine.store.store import Store, StoreError
from engine.tasks.problems import load_problems
from engine.tasks.reward import overlong_penalty, resolve_verifier
from engine.train.evaluate import decode_responses, encode_prompts, evaluate
from engine.update.loss import agg_weights, masked_mean, policy_loss
from engine.update.shares import (
    LossSpec,
    Share,
    active_rows,
    backward,
    cut,
    merge,
    pool_backward,
    response_logits,
    split_share,
    take,
)


class Timer:
    """Seconds per phase of one step: ``with timer("generate"): ...`` adds to ``timer.t["generate"]``."""

    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class StepBatch:
    """One step's training batch: ``B = groups x rollout.n`` responses, prompt-major (row b is in group
    ``b // rollout.n``). ``Trainer.sample`` builds it (generate, score, DAPO refills merged); the
    forward, shaping, update, metrics and store tables all read it."""

    ro: Rollouts  # (B, Lp) prompts and (B, T) responses; logprobs/entropy (B, T) when the engine recorded them
    prompt_idx: list[int]  # (B,) train-set index of each row's prompt
    group: list[int]  # (B,) group id 0..groups-1
    texts: list[str]  # (B,) decoded responses
    correct: list[bool]  # (B,) verifier verdicts
    rewards: list[float]  # (B,) verdict + overlong penalty
    rounds: int = 1  # generation rounds this step took (dynamic sampling refills)

    @property
    def polarity(self) -> torch.Tensor:
        """``(B,)`` int8: +1 for a correct response, -1 otherwise."""
        return torch.tensor([1 if c else -1 for c in self.correct], dtype=torch.int8)

    def groups(self, n: int) -> list[StepBatch]:
        """Each group of ``n`` consecutive rows as a batch of its own."""
        return [self.take(list(range(g, g + n))) for g in range(0, len(self.texts), n)]

    def take(self, rows: list[int]) -> StepBatch:
        """Rows ``rows`` (in that order) of every field."""
        r = torch.tensor(rows, dtype=torch.long)
        return StepBatch(
            self.ro.rows(r),
            [self.prompt_idx[i] for i in rows],
            [self.group[i] for i in rows],
            [self.texts[i] for i in rows],
            [self.correct[i] for i in rows],
            [self.rewards[i] for i in rows],
            self.rounds,
        )

    @staticmethod
    def concat(parts: list[StepBatch], pad_id: int, n: int, rounds: int) -> StepBatch:
        """Groups from several generation rounds as one batch: prompts left-padded and responses
        right-padded to the longest, groups renumbered 0.. in order."""
        ro = Rollouts.concat([p.ro for p in parts], pad_id)
        B = ro.response_ids.shape[0]
        return StepBatch(
            ro,
            [i for p in parts for i in p.prompt_idx],
            [b // n for b in range(B)],
            [t for p in parts for t in p.texts],
            [c for p in parts for c in p.correct],
            [r for p in parts for r in p.rewards],
            rounds,
        )


class OldPolicy(NamedTuple):
    """What the update and the shaping need from the policy that sampled the batch, ``(B, T)`` each."""

    logprobs: torch.Tensor  # old-policy log-probs of the sampled tokens (detached)
    entropy: torch.Tensor  # entropy of each sampling distribution (logits / temperature)
    ref_logprobs: torch.Tensor | None  # reference model's, when actor.kl_coef > 0
    live: torch.Tensor | None  # on-policy single pass: the same log-probs with their graph, reused by the loss


class StepResult(NamedTuple):
    """One training step: the ``steps`` row's metrics and the step's tables (rollouts, tokens)."""

    metrics: dict[str, float]
    tables: dict[str, pa.Table]


class Trainer:
    """Holds the policy, data, store and optimiser of one run. See module docstring."""

    def __init__(self, cfg: Config, store: Store, run_id: str | None = None, log=None, study: str | None = None):
        self.cfg = cfg
        self.store = store
        self.log = log or (lambda s: print(s, file=sys.stderr))
        torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        self.resolved = r = resolve(cfg)  # every "null = algorithm default" filled in once; stored in run.json
        self.clip_low, self.clip_high, self.agg = r.clip_ratio_low, r.clip_ratio_high, r.loss_agg_mode
        self.dynamic, self.overlong_buffer = r.dynamic_sampling, r.overlong_buffer
        self.train_set = load_problems(
            cfg.data.train, "train", prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key
        )
        self.test_set = load_problems(
            cfg.data.test, "test", prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key
        )
        self.verify = resolve_verifier(cfg.data.train, cfg.data.verifier)
        self.verify_test = resolve_verifier(cfg.data.test, cfg.data.verifier)
        if cfg.eval.n_prompts:
            self.test_set = self.test_set[: cfg.eval.n_prompts]
        self.model, self.tok, self.device = load_policy(
            cfg.model.path,
            device=cfg.model.device,
            dtype=cfg.model.dtype,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        )
        self.ref = None
        if cfg.actor.kl_coef > 0:
            self.ref, _, _ = load_policy(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype)
            self.ref.eval().requires_grad_(False)
        # our own forward for the update when the architecture allows it (engine/model/fast_forward.py)
        self.fast = cfg.model.fast_forward and fast_forward.unsupported_reason(self.model) is None
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(
            params,
            lr=cfg.actor.lr,
            betas=tuple(cfg.actor.betas),
            weight_decay=cfg.actor.weight_decay,
            # one kernel for all parameters instead of a dozen per tensor (transformers' default optimizer,
            # adamw_torch_fused, does the same); the same update up to float rounding
            fused=all(p.device.type in ("cpu", "cuda") for p in params),
        )
        self.backend = make_backend(cfg.rollout.backend, self.model, self.tok, cfg)
        self.train_prompts = encode_prompts(
            self.tok, self.train_set, cfg.data.prompt_template, cfg.data.chat_template, cfg.data.max_prompt_tokens
        )
        self.vocab_text = self._vocab_text()
        self.start_step = 0
        if run_id is None:
            # the run appears with our writer lease already in it: nobody else can write it in between
            self.run_id = store.create_run(cfg.to_dict(), name=cfg.name, study=study, lease=True)
        else:
            self.run_id = run_id
            store.acquire_writer(run_id)  # before touching any file of the run
            try:
                self.start_step = self._restore()
                store.clean_temp(run_id)
            except BaseException:
                store.release_writer(run_id)
                raise
        self.model.train()

    # ------------------------------------------------------------------ data
    def _vocab_text(self) -> pa.Array:
        """Text of every token id, decoded once, so token rows are built with one Arrow take."""
        V = max(len(self.tok), self.model.config.vocab_size)
        try:
            texts = self.tok.batch_decode([[i] for i in range(V)])
        except Exception:  # ids past the tokenizer's vocabulary (padded embedding rows)
            texts = []
            for i in range(V):
                try:
                    texts.append(self.tok.decode([i]))
                except Exception:
                    texts.append("")
        return pa.array(texts, type=pa.string())

    def prompt_indices(self, step: int, count: int, round_: int = 0) -> list[int]:
        """Deterministic prompt order: epoch-wise permutations seeded by (seed, epoch)."""
        N = len(self.train_set)
        per_step = self.cfg.train.prompts_per_step
        start = (
            ((step - 1) * per_step * self.cfg.algorithm.max_gen_batches + round_ * per_step)
            if self.dynamic
            else (step - 1) * per_step
        )
        out = []
        for j in range(start, start + count):
            epoch, pos = divmod(j, N)
            perm = self._perm(epoch)
            out.append(perm[pos])
        return out

    def _perm(self, epoch: int) -> list[int]:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            rng = random.Random(f"{self.cfg.seed}-{epoch}")
            perm = list(range(len(self.train_set)))
            rng.shuffle(perm)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    # ------------------------------------------------------------------ checkpoint
    def ckpt_dir(self) -> Path:
        return self.store.run_dir(self.run_id) / "checkpoint"

    def save_checkpoint(self, step: int) -> None:
        d = self.ckpt_dir()
        tmp = d.with_name(".checkpoint-tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        torch.save({"optimizer": self.opt.state_dict(), "step": step}, tmp / "trainer_state.pt")
        if d.exists():
            old = d.with_name(".checkpoint-old")
            if old.exists():
                shutil.rmtree(old)
            d.rename(old)
            tmp.rename(d)
            shutil.rmtree(old)
        else:
            tmp.rename(d)
        self.store.update_run(self.run_id, checkpoint_step=step)

    def _restore(self) -> int:
        d = self.ckpt_dir()
        if not (d / "trainer_state.pt").exists():
            old = d.with_name(".checkpoint-old")
            d = old if (old / "trainer_state.pt").exists() else None
        step = 0
        if d is not None:
            from safetensors.torch import load_file

            state = load_file(str(d / "model.safetensors"), device=str(self.device))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            bad = [k for k in missing if "lm_head" not in k]
            if bad or unexpected:
                raise RuntimeError(
                    f"checkpoint {d} does not match the model ({len(bad)} missing, {len(unexpected)} unexpected keys)"
                )
            self.model.tie_weights()
            ts = torch.load(d / "trainer_state.pt", map_location=self.device, weights_only=False)
            self.opt.load_state_dict(ts["optimizer"])
            step = int(ts["step"])
        removed = self.store.truncate_after(self.run_id, step)
        self.log(
            f"resuming {self.run_id} from step {step} (dropped {removed} uncheckpointed steps; they are recomputed)"
        )
        return step

    # ------------------------------------------------------------------ one step
    def sample(self, step: int, timer: Timer) -> StepBatch:
        """Generate and score; with dynamic sampling keep only mixed groups, refilling up to max_gen_batches."""
        cfg = self.cfg
        P, n = cfg.train.prompts_per_step, cfg.rollout.n
        kept: list[StepBatch] = []
        rounds = 0
        while True:
            idx = self.prompt_indices(step, P, rounds)
            params = SamplingParams(
                n=n,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k,
                max_new_tokens=cfg.rollout.max_new_tokens,
                seed=cfg.seed * 1_000_003 + step * 101 + rounds,
            )
            with timer("generate"):
                ro = self.backend.generate([self.train_prompts[i] for i in idx], params)
            with timer("score"):
                texts = decode_responses(self.tok, ro.response_ids, ro.response_mask)
                correct = [self.verify(t, self.train_set[idx[b // n]]) for b, t in enumerate(texts)]
                lengths = ro.response_mask.sum(1).tolist()
                rewards = [
                    float(c) + overlong_penalty(int(L), cfg.rollout.max_new_tokens, self.overlong_buffer)
                    for c, L in zip(correct, lengths)
                ]
            rounds += 1
            got = StepBatch(
                ro, [i for i in idx for _ in range(n)], [b // n for b in range(len(texts))], texts, correct, rewards
            )
            groups = got.groups(n)
            kept += [g for g in groups if not (self.dynamic and len(set(g.rewards)) == 1)]
            if not self.dynamic or len(kept) >= P or rounds >= cfg.algorithm.max_gen_batches:
                break
        if not kept:  # dynamic sampling found no mixed group: train on the last round as is (zero advantage)
            kept = groups
        return StepBatch.concat(kept[:P], self.tok.pad_token_id, n, rounds)

    def _old_policy(self, ro: Rollouts) -> OldPolicy:
        """Old-policy log-probs and entropies: recorded by the rollout engine, or one forward pass.

        The rollout engine ran this very policy (same weights, same dtype) when it recorded the sampled
        tokens' log-probs and the entropies of logits / temperature: those are the old policy's, so a
        separate no-grad forward is redundant. ``actor.recompute_old_logprobs`` forces it (verl's way).
        With one on-policy mini-batch (``ppo_epochs = mini_batches = 1``) the forward with grad that the
        loss needs doubles as the old policy's (ratio 1), so nothing extra runs either."""
        cfg = self.cfg
        chunk, temp = cfg.model.logit_chunk, cfg.rollout.temperature
        single_pass = cfg.actor.ppo_epochs == 1 and cfg.actor.mini_batches == 1
        recorded = ro.logprobs is not None and ro.entropy is not None and not cfg.actor.recompute_old_logprobs
        if single_pass and recorded and (self._update_pool() is not None or cfg.actor.skip_zero_advantage):
            # the update's forward is split or skips rows; the recorded log-probs are the old policy's
            single_pass = False
        dtype = next(self.model.parameters()).dtype
        live = None
        if single_pass or not recorded:
            with nullcontext() if single_pass else torch.no_grad():
                logits = response_logits(self.model, ro, temp, self.fast)
                if recorded:
                    lp, ent = token_logprobs(logits, ro.response_ids, chunk_size=chunk), ro.entropy.to(dtype)
                else:  # both from one log-softmax per chunk
                    lp, ent = token_logprobs_entropy(logits, ro.response_ids, chunk_size=chunk)
            old_lp, live, ent = lp.detach(), (lp if single_pass else None), ent.detach()
        else:
            old_lp, ent = ro.logprobs.to(dtype), ro.entropy.to(dtype)
        ref_lp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_lp = token_logprobs(
                    response_logits(self.ref, ro, temp, self.fast), ro.response_ids, chunk_size=chunk
                )
        return OldPolicy(old_lp, ent, ref_lp, live)

    def step(self, step: int) -> StepResult:
        """One RL step: sample and score, old policy, shape, update; the metrics and tables to store."""
        timer, t0 = Timer(), time.perf_counter()
        batch = self.sample(step, timer)
        ro = batch.ro.to(self.device)
        scores = torch.tensor(batch.rewards, dtype=torch.float32, device=self.device)
        polarity = batch.polarity.to(self.device)
        with timer("forward"):
            old = self._old_policy(ro)
        with timer("shaping"):
            shaped = shape_advantages(
                self.resolved,
                scores=scores,
                group_ids=batch.group,
                polarity=polarity,
                response_mask=ro.response_mask,
                logprobs=old.logprobs,
                entropy=old.entropy,
                step=step - 1,  # finished steps: the first update uses alpha0
            )
        with timer("update"):
            upd = self._update(ro, old.logprobs, shaped.adv, old.ref_logprobs, old.live)
            self.backend.sync_weights(self.model)  # no-op for HF; pushes weights into a vLLM engine
        metrics = self._metrics(batch, ro, old, shaped, polarity, scores, upd)
        with timer("store"):  # building the rows; writing them is timed by the caller
            tables = self._tables(step, batch, ro, old, shaped, polarity)
        metrics.update({f"t_{k}": v for k, v in timer.t.items()})
        metrics["t_step"] = time.perf_counter() - t0
        return StepResult(metrics, tables)

    def _update(self, ro: Rollouts, old_lp, adv, ref_lp, lp_live) -> dict:
        """PPO epochs over mini-batches: forward, clipped surrogate (+ KL to the reference), step.

        Each mini-batch is cut to its own columns (``engine.update.shares.cut``): the batch is padded to its
        longest prompt and response, a mini-batch only to its own, and the padding columns it drops are
        masked out of the loss anyway, so the numbers are the same with less forward/backward work.
        Log-probs are computed on the response tokens only. ``norm_len`` stays the batch's padded
        length, which is what ``seq-mean-token-sum-norm`` divided by before the cut. With CPU rollout
        workers (``_update_pool``) each mini-batch is split between them into shares of equal tokens
        (``engine.update.shares``: at a row, so a group may be cut in two) and their gradients are added before
        clipping and the optimizer step. Each process can run its rows as micro-batches of about
        ``actor.micro_batch_tokens`` tokens (when set)."""
        cfg = self.cfg
        B, T = adv.shape
        stats = {"clipfrac": [], "clipfrac_lower": [], "approx_kl": [], "kl_ref": [], "loss": [], "grad_norm": []}
        mbs = [self._mini_batch(ro, rows) for rows in torch.arange(B).chunk(cfg.actor.mini_batches)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.actor.grad_clip if cfg.actor.grad_clip > 0 else float("inf")
        spec = LossSpec(
            self.clip_low,
            self.clip_high,
            cfg.actor.clip_ratio_c,
            cfg.rollout.temperature,
            cfg.model.logit_chunk,
            self.fast,
            cfg.actor.kl_type,
            cfg.actor.kl_coef,
            cfg.actor.micro_batch_tokens,
        )
        pool = self._update_pool()
        tis = self._rollout_is(ro, old_lp)
        for _epoch in range(cfg.actor.ppo_epochs):
            for rows, sub in mbs:
                live = lp_live is not None  # on-policy single pass: the step's forward already has them
                if live:
                    sub, rows = ro, torch.arange(B)
                cols = slice(0, sub.response_ids.shape[1])
                m = sub.response_mask
                old, a = old_lp[rows, cols], adv[rows, cols]
                ref = None if ref_lp is None else ref_lp[rows, cols]
                w = agg_weights(m, self.agg, float(T), old.dtype)
                if tis is not None:
                    w = w * tis[rows, cols]
                kl_w = None if ref is None else agg_weights(m, "token-mean", None, old.dtype)
                whole = Share(sub, old, a, w, ref, kl_w)
                run = torch.arange(len(rows), device=m.device)  # the rows that go through forward/backward
                if cfg.actor.skip_zero_advantage and not live:
                    run = active_rows(whole, spec.kl_coef).nonzero().squeeze(1)
                work = whole if len(run) == len(rows) else take(whole, run)
                if not len(run):
                    shares, jobs = [], []
                elif live or pool is None:
                    shares, jobs = [slice(0, len(run))], [work]
                else:  # each worker's rows, cut to their own columns; equal to a row, so a group may be cut
                    shares, jobs = zip(*split_share(work, pool.workers, whole_groups=False))
                self.opt.zero_grad(set_to_none=True)
                if len(jobs) > 1:
                    results = pool_backward(pool, jobs, spec, params, lambda job: backward(self.model, job, spec))
                else:
                    results = [backward(self.model, job, spec, lp_live if live else None) for job in jobs]
                for p in params:  # no row ran: a zero gradient still steps the optimizer (moments, weight decay)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                # rows left out keep ratio 1 in the metrics below, and are masked out of them
                res = merge([(run[sl], r) for sl, r in zip(shares, results)], old.clone())
                lp = res.logprobs
                gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if torch.isfinite(gn):
                    self.opt.step()
                else:
                    self.log("non-finite grad norm: update skipped")
                ran = torch.zeros_like(m)
                ran[run] = m[run]
                with torch.no_grad():  # the metrics over the rows that ran, whatever the split
                    _, met = policy_loss(
                        lp, old, a, ran, clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=spec.dual_clip
                    )
                share_ran = float(ran.sum() / m.sum()) if m.any() else 0.0
                stats["loss"].append(res.loss)
                if ref is not None:
                    stats["kl_ref"].append(0.0 if res.kl is None else res.kl)
                stats["grad_norm"].append(float(gn))
                for k in ("clipfrac", "clipfrac_lower"):  # over the mini-batch: a left-out token is never clipped
                    stats[k].append(met[k] * share_ran if ran.any() else 0.0)
                if ran.any():
                    stats["approx_kl"].append(met["approx_kl"])
                lp_live = None
        return {k: (float(np.mean(v)) if v else 0.0) for k, v in stats.items()}

    def _rollout_is(self, ro: Rollouts, old_lp):
        """``(B, T)`` truncated importance weights ``min(π_train / π_rollout, threshold)`` of the sampled tokens
        (``actor.rollout_is=token``, verl's token-level rollout correction), 1 where the sampler gave no
        log-prob; None when off. Detached: they reweight each token's loss, like verl's."""
        if self.cfg.actor.rollout_is is None:
            return None
        if ro.logprobs is None:
            raise RuntimeError("actor.rollout_is needs the sampler's log-probs; this rollout backend records none")
        ratio = torch.exp(old_lp.detach().float() - ro.logprobs.to(old_lp.device).float())
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        return ratio.clamp(max=self.cfg.actor.rollout_is_threshold).to(old_lp.dtype)

    def _update_pool(self):
        """The kv engine's CPU worker pool when the update may be split between its processes, else None."""
        if not self.cfg.actor.split_update:
            return None
        return getattr(self.backend, "pool", None)

    @staticmethod
    def _mini_batch(ro: Rollouts, rows: torch.Tensor) -> tuple[torch.Tensor, Rollouts]:
        """Rows ``rows`` of the batch without the padding columns that all of them share (``cut``)."""
        return rows, cut(ro, rows)

    def _metrics(self, batch: StepBatch, ro, old: OldPolicy, shaped, polarity, scores, upd) -> dict:
        mask = ro.response_mask.bool()
        pos = (polarity == 1).unsqueeze(-1) & mask
        neg = (polarity == -1).unsqueeze(-1) & mask
        lengths = mask.sum(1).float()
        n = self.cfg.rollout.n
        corr = torch.tensor(batch.correct, dtype=torch.float32).reshape(-1, n)
        old_lp, ent = old.logprobs, old.entropy
        a_abs = shaped.adv.abs()

        def mm(x, m):
            return float(masked_mean(x, m)) if m.any() else float("nan")

        def ml(sel):
            return float(lengths[sel].mean()) if sel.any() else float("nan")

        # Effective push (Σ|Δadv|·(1−p)): what the token rules add, and what the raw advantage gives.
        push_rule = gradient_push(shaped.adv_tokens_raw, shaped.adv, old_lp, ro.response_mask, polarity)
        push_raw = gradient_push(
            torch.zeros_like(shaped.adv_tokens_raw), shaped.adv_tokens_raw, old_lp, ro.response_mask, polarity
        )
        return {
            "reward": float(scores.mean()),
            "acc": float(corr.mean()),
            "entropy": mm(ent, mask),
            "entropy_pos": mm(ent, pos),
            "entropy_neg": mm(ent, neg),
            "length": float(lengths.mean()),
            "length_pos": ml(polarity == 1),
            "length_neg": ml(polarity == -1),
            "frac_all_correct": float((corr.min(1).values == 1).float().mean()),
            "frac_all_wrong": float((corr.max(1).values == 0).float().mean()),
            "truncated_frac": float(ro.truncated.float().mean()),
            "push_pos": float((a_abs * pos).sum()),
            "push_neg": float((a_abs * neg).sum()),
            "push_rule_pos": push_rule["positive"],
            "push_rule_neg": push_rule["negative"],
            "push_raw_pos": push_raw["positive"],
            "push_raw_neg": push_raw["negative"],
            "key_frac": float(shaped.key_mask[mask].float().mean()) if mask.any() else 0.0,
            "alpha_pos": shaped.alpha_pos,  # the algorithm's own scales; extra token_rules are not alphas
            "alpha_neg": shaped.alpha_neg,
            "n_rollouts": float(mask.shape[0]),
            "gen_rounds": float(batch.rounds),
            **self._mismatch(ro, old_lp, mask),
            **upd,
        }

    @staticmethod
    def _mismatch(ro: Rollouts, old_lp, mask) -> dict:
        """The step's training-inference mismatch (``engine.store.schema.mismatch_metrics``): the trainer's
        old-policy log-probs against the ones the backend sampled with; NaN when it records none (``hf``)."""
        if ro.logprobs is None:
            return mismatch_metrics([], [])
        return mismatch_metrics(old_lp.detach().float()[mask].cpu().numpy(), ro.logprobs.float()[mask].cpu().numpy())

    def _tables(self, step, batch: StepBatch, ro, old: OldPolicy, shaped, polarity) -> dict:
        return step_tables(
            self.run_id,
            step,
            mask=ro.response_mask,
            token_ids=ro.response_ids,
            logprob=old.logprobs,
            entropy=old.entropy,
            adv_tokens_raw=shaped.adv_tokens_raw,
            adv_shaped=shaped.adv,
            is_key=shaped.key_mask,
            polarity=polarity,
            token_text=lambda ids: self.vocab_text.take(pa.array(ids)),
            with_tokens=self.cfg.train.store_tokens,
            rollout_logprob=ro.logprobs,
            rollouts={
                "group_idx": np.array(batch.group, np.int32),
                "prompt_idx": np.array(batch.prompt_idx, np.int64),
                "prompt": [self.train_set[i].prompt for i in batch.prompt_idx],
                "response": batch.texts,
                "answer": [self.train_set[i].answer for i in batch.prompt_idx],
                "reward": np.array(batch.rewards, np.float32),
                "correct": batch.correct,
                "truncated": ro.truncated.cpu().numpy(),
                "adv_raw": shaped.adv_raw.float().cpu().numpy(),
            },
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> tuple[dict, pa.Table]:
        cfg = self.cfg
        self.model.eval()
        ks = cfg.eval.final_k if (step == cfg.train.steps and cfg.eval.final_k) else cfg.eval.k
        res = evaluate(
            self.backend,
            self.tok,
            self.test_set,
            ks=ks,
            temperature=cfg.eval.temperature,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            seed=cfg.seed + 7919,
            template=cfg.data.prompt_template,
            chat=cfg.data.chat_template,
            verify=self.verify_test,
        )
        self.model.train()
        return res, evals_table(self.run_id, step, res)

    # ------------------------------------------------------------------ loop
    def fit(self, progress: bool = True) -> dict:
        """Train from ``start_step`` to ``train.steps`` as the run's only writer.

        The writer lease is held for the whole loop and released however it ends (finished, failed,
        interrupted); a SIGKILL leaves a stale lease that the next resume takes over. run.json's
        ``last_step`` follows every stored step, so a kill never leaves it behind the steps table."""
        store, rid = self.store, self.run_id
        store.acquire_writer(rid)
        try:
            return self._fit(progress)
        finally:
            try:
                store.purge_retired(rid)
            except OSError:
                pass  # leftovers are skipped by readers and removed by the next compaction
            store.release_writer(rid)

    def _fit(self, progress: bool) -> dict:
        cfg = self.cfg
        S = cfg.train.steps
        store, rid = self.store, self.run_id
        store.update_run(
            rid,
            status="running",
            pid=os.getpid(),
            host=socket.gethostname(),
            writer_lease=True,
            error=None,
            last_step=self.start_step,
            resolved=self.resolved.to_dict(),
        )
        self.log(f"run {rid}: {cfg.algorithm.name}, {S} steps, store {store.root}")
        last_eval = None
        try:
            if self.start_step == 0 and cfg.eval.at_start:
                res, et = self.evaluate(0)
                store.write_step(rid, 0, {"evals": et})
                last_eval = res
                self.log(f"step 0: greedy acc {res['greedy_acc']:.3f}, sampled acc {res['sampled_acc']:.3f}")
            bar = _progress(range(self.start_step + 1, S + 1), S, self.start_step, progress)
            for step in bar:
                metrics, tables = self.step(step)
                evals = None
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == S:
                    t_e = time.perf_counter()
                    last_eval, evals = self.evaluate(step)
                    metrics["t_eval"] = time.perf_counter() - t_e
                    metrics["test_acc"] = last_eval["sampled_acc"]
                    metrics["test_greedy_acc"] = last_eval["greedy_acc"]
                    tables["evals"] = evals
                # one atomic segment; the store adds its write time to t_store and t_step in the row
                metrics["t_step"] += store.write_step(rid, step, tables, metrics=metrics)  # for the progress bar
                if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == S:
                    self.save_checkpoint(step)
                    if step % cfg.train.compact_every == 0 or step == S:
                        store.compact(rid, step)
                store.update_run(rid, last_step=step)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        reward=f"{metrics['reward']:.2f}",
                        acc=f"{metrics['acc']:.2f}",
                        ent=f"{metrics['entropy']:.3f}",
                        len=f"{metrics['length']:.1f}",
                        s_per_step=f"{metrics['t_step']:.2f}",
                        refresh=False,
                    )
            if self.start_step >= S:  # resumed after the final checkpoint: finish what the kill interrupted
                store.compact(rid, S)
                if last_eval is None:
                    last_eval = self._stored_eval(S)  # the final step's eval is already in the store
            final_acc = last_eval["sampled_acc"] if last_eval else None
            if cfg.train.save_final_model:
                out = store.run_dir(rid) / "final"
                self.model.save_pretrained(out, safe_serialization=True)
                self.tok.save_pretrained(out)
            store.update_run(
                rid,
                status="finished",
                last_step=S,
                final_accuracy=final_acc,
                final_greedy_accuracy=last_eval["greedy_acc"] if last_eval else None,
            )
            return {"run_id": rid, "final": last_eval}
        except KeyboardInterrupt:
            self._record(status="killed", error="interrupted")
            raise
        except Exception as e:
            self._record(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            raise

    def _record(self, **fields) -> None:
        """Best-effort final status: when run.json cannot be written either (disk full, read-only),
        the original error must still reach the caller, not this one."""
        try:
            self.store.update_run(self.run_id, **fields)
        except Exception as e:
            self.log(f"could not record {fields.get('status')} in run.json: {type(e).__name__}: {e}")

    def _stored_eval(self, step: int) -> dict | None:
        """The eval the store holds for ``step``, in ``evaluate``'s result shape; None when absent."""
        df = self.store.query(
            "select metric, k, value, n from evals where run_id = ? and step = ?",
            [self.run_id, step],
            run_ids=[self.run_id],
        )
        if df.empty:
            return None
        res = {"greedy_acc": None, "sampled_acc": None, "pass@k": {}, "n_prompts": int(df["n"].iloc[0])}
        for metric, k, value in zip(df["metric"], df["k"], df["value"]):
            if metric == "pass@k":
                res["pass@k"][int(k)] = float(value)
            elif metric in ("greedy_acc", "sampled_acc"):
                res[metric] = float(value)
        return res if res["sampled_acc"] is not None else None


def _progress(it, total, start, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def train(cfg: Config, store: Store, *, progress: bool = True, study: str | None = None, log=None) -> dict:
    return Trainer(cfg, store, log=log, study=study).fit(progress)


def resume(run_id: str, store: Store, *, progress: bool = True, log=None) -> dict:
    """Continue a killed or failed run from its checkpoint.

    The lease is taken before the model is loaded, so resuming a run that is still being written
    fails at once with a one-line StoreError naming its writer."""
    meta = store.read_run(run_id)
    if meta.get("status") == "finished":
        raise StoreError(
            f"run {run_id!r} already finished (step {meta.get('last_step')}) — start a new run instead of resuming it"
        )
    store.acquire_writer(run_id)
    try:
        cfg = config_from_dict(meta["config"])
        trainer = Trainer(cfg, store, run_id=run_id, log=log)
    except BaseException:
        store.release_writer(run_id)
        raise
    return trainer.fit(progress)
