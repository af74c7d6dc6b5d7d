"""A3PO for TRL: a ``GRPOTrainer`` subclass that shapes per-token advantages and logs every token.

Why: users who scale out with TRL (accelerate: DDP, DeepSpeed ZeRO, FSDP) keep the same shaping
functions and the same store. TRL computes one advantage per completion; after it does, we run one
extra no-grad forward for the old-policy log-probs and entropies (through TRL's own
``_get_per_token_logps_and_entropies``, chunked by ``per_device_train_batch_size`` like TRL's own
forwards), apply the engine's one shaping function ``engine.shaping.algorithms.shape_tokens`` (A3PO's
decaying asymmetric rules, resolved from the same config an ``a3po train`` run would use), and hand
TRL a ``(B, T)`` advantage tensor, which its loss accepts as is.

    from engine.integrations.trl import A3POGRPOTrainer
    trainer = A3POGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=ds,
                              a3po={"alpha_pos": 2.0, "alpha_neg": 2.0, "decay": "linear"}, store="runs")
    trainer.train()

    accelerate launch examples/trl_a3po.py          # multi-GPU

Options (``a3po=``) are the engine's ``algorithm.*`` keys and are checked by the engine's own config
checks. The decay horizon is ``decay_steps`` or else TRL's real ``state.max_steps`` (also right for
epoch-based runs, where ``args.max_steps`` is -1).

Polarity is the verifier's verdict when the dataset has an ``answer`` column (the verifier of the
task named by ``data=``, e.g. ``builtin:countdown``; math-verify otherwise), else the sign of TRL's
advantage (the same thing for 0/1 rewards in mixed groups).

Evaluation batches (``model.training`` False) keep TRL's own advantages and are not logged.

Store: run.json's config is an engine config (``engine.config.config_from_dict`` accepts it), so the
app's pages open a TRL run like one of ours. With several processes every process's shard is
logged: the store's public API names a step segment by its step alone (``step_000012``), so two
ranks cannot each write their own segment for one step; instead every rank builds its rows, the
main process gathers them with accelerate's ``gather_object`` and writes the step once.
"""

from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from engine.config import MAX_STEPS, ConfigError, config_from_dict
from engine.rollout.vllm import push_weights
from engine.shaping.algorithms import ResolvedAlgorithm, Shaped, resolve, shape_tokens
from engine.store.schema import metrics_from_rollouts, step_tables
from engine.store.store import Store
from engine.tasks.problems import Problem
from engine.tasks.reward import resolve_verifier

# The A3PO options a TRL run takes: the engine's own ``algorithm.*`` keys (defaults and ranges live in
# engine.config.AlgorithmConfig, nowhere else).
A3PO_OPTIONS = (
    "ratio",
    "alpha_pos",
    "alpha_neg",
    "decay",
    "decay_rate",
    "decay_steps",
    "w_pos",
    "w_neg",
    "token_rules",
)


def a3po_options(a3po: dict | None) -> dict:
    """The A3PO options with the engine's defaults filled in, checked by the engine's own config checks.

    Why: a TRL user and an ``a3po train`` user get the same one-line error for the same bad value
    (``engine.config.ConfigError``, a ValueError)."""
    unknown = sorted(set(a3po or {}) - set(A3PO_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown A3PO option(s) {', '.join(map(repr, unknown))} — use only {', '.join(A3PO_OPTIONS)}"
        )
    algo = config_from_dict({"algorithm": {"name": "a3po", **(a3po or {})}}).algorithm
    return {k: getattr(algo, k) for k in A3PO_OPTIONS}


def _model_path(model) -> str:
    cfg = getattr(getattr(model, "module", model), "config", None)
    return str(getattr(cfg, "_name_or_path", "") or "trl-model")


def _colocate_sync_weights(gen) -> None:
    """TRL's colocated weight push (``VLLMGeneration.sync_weights``, colocate mode) through vLLM's in-place
    reload (``engine.rollout.vllm.push_weights``): TRL 1.16 calls ``model_runner.model.load_weights``
    directly, which fails on vLLM 0.32 ("'Parameter' object has no attribute 'weight_loader'"). The
    parameters still come from TRL's own iterator (it gathers FSDP / ZeRO-3 shards and merges PEFT adapters),
    and sleep mode is handled as TRL does: wake the weights, then push."""
    if gen.enable_sleep_mode:
        gen.llm.wake_up(tags=["weights"])
        gen._llm_weights_sleeping = False
    config = getattr(gen.model, "config", None)
    push_weights(gen.llm, gen._iter_named_params(), tied=bool(getattr(config, "tie_word_embeddings", False)))


class A3POGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with A3PO token shaping and the engine's store."""

    def __init__(
        self,
        *args,
        a3po: dict | None = None,
        store: str | Store | None = None,
        run_name: str | None = None,
        data: str = "trl-dataset",
        model_path: str | None = None,
        **kw,
    ):
        self.a3po = a3po_options(a3po)  # before TRL's (slow) setup, so a typo fails at once
        super().__init__(*args, **kw)
        gen = getattr(self, "vllm_generation", None)
        if gen is not None and getattr(gen, "mode", None) == "colocate":
            gen.sync_weights = types.MethodType(_colocate_sync_weights, gen)
        self.a3po_store = Store(store) if isinstance(store, str) else store
        self.a3po_run = None
        self._a3po_run_name = run_name
        self._a3po_data = data
        self._a3po_model_path = model_path or _model_path(self.model)
        self._a3po_verifier = resolve_verifier(data)
        if self.a3po_store is not None:
            # Check the run's engine config now (train.steps is provisional until train() knows it):
            # a value the engine refuses must fail here on every rank, not later on the main process
            # alone while the other ranks wait in a collective.
            self.engine_config()

    def _a3po_correct(self, text: str, row: dict) -> bool:
        prompt, bos = str(row.get("prompt", "")), getattr(self.processing_class, "bos_token", None) or ""
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return bool(self._a3po_verifier(text, Problem(prompt=prompt, answer=str(row["answer"]))))

    # ------------------------------------------------------------------ the run's config
    def engine_config(self) -> dict:
        """run.json's config: an engine config describing this TRL run (the app replays it)."""
        a = self.args
        steps = int(self.state.max_steps) if self.state.max_steps and self.state.max_steps > 0 else int(a.max_steps)
        G = int(self.num_generations)
        spec = {
            "seed": int(a.seed),
            "name": self._a3po_run_name,
            "model": {"path": self._a3po_model_path},
            "data": {"train": self._a3po_data, "test": self._a3po_data},
            "rollout": {
                "n": G,
                "temperature": float(a.temperature),
                "top_p": float(a.top_p),
                "top_k": int(a.top_k or 0),
                "max_new_tokens": int(a.max_completion_length),
            },
            "algorithm": {"name": "a3po", **self.a3po},
            "actor": {"lr": float(a.learning_rate), "ppo_epochs": int(self.num_iterations), "kl_coef": float(a.beta)},
            "train": {
                "steps": max(1, min(steps, MAX_STEPS)),
                "prompts_per_step": max(
                    1,
                    int(a.per_device_train_batch_size)
                    * int(a.steps_per_generation)
                    * int(self.accelerator.num_processes)
                    // G,
                ),
            },
        }
        return config_from_dict(spec).to_dict()

    def _a3po_start_run(self) -> None:
        if self.a3po_run is None and self.accelerator.is_main_process:
            cfg = self.engine_config()
            self.a3po_run = self.a3po_store.create_run(cfg, name=self._a3po_run_name)
            self.a3po_store.update_run(
                self.a3po_run,
                status="running",
                total_steps=cfg["train"]["steps"],
                resolved=self.a3po_resolved().to_dict(),
            )

    # ------------------------------------------------------------------ shaping
    def a3po_horizon(self) -> int:
        """The decay horizon S: ``decay_steps``, else TRL's real step count ``state.max_steps``."""
        return self.a3po_resolved().decay_steps

    def a3po_resolved(self) -> ResolvedAlgorithm:
        """This run's resolved algorithm (``engine.shaping.algorithms.resolve`` of ``engine_config()``), the
        one the shaping uses and run.json stores; rebuilt only when TRL's ``state.max_steps`` changes."""
        key = int(self.state.max_steps)
        if getattr(self, "_a3po_resolved", (None, None))[0] != key:
            self._a3po_resolved = (key, resolve(config_from_dict(self.engine_config())))
        return self._a3po_resolved[1]

    def a3po_shape(self, adv, polarity, mask, logps, ent, step: int) -> Shaped:
        """TRL's ``(B,)`` advantages -> the ``(B, T)`` advantages its loss takes: ``engine.shaping.algorithms.shape_tokens``."""
        return shape_tokens(self.a3po_resolved(), adv, polarity, mask, logps, ent, step)

    def _a3po_old_logps(self, full_ids, full_mask, n_completion):
        """Old-policy log-probs and entropies, in chunks of ``per_device_train_batch_size`` rows as TRL does."""
        with torch.no_grad():
            logps, ent, _ = self._get_per_token_logps_and_entropies(
                self.model,
                full_ids,
                full_mask,
                n_completion,
                batch_size=self.args.per_device_train_batch_size,
                compute_entropy=True,
            )
        return logps, ent

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation: TRL's own advantages, nothing logged
            return out
        ids, mask = out["completion_ids"], out["completion_mask"]
        full_ids = torch.cat([out["prompt_ids"], ids], dim=1)
        full_mask = torch.cat([out["prompt_mask"], mask], dim=1)
        logps, ent = self._a3po_old_logps(full_ids, full_mask, ids.size(1))
        adv = out["advantages"]
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        local = list(inputs[: len(texts)])
        if len(local) == len(texts) and all("answer" in x for x in local):
            correct = [self._a3po_correct(t, x) for t, x in zip(texts, local)]
            polarity = torch.tensor([1 if c else -1 for c in correct], device=adv.device)
        else:
            correct = (adv > 0).tolist()
            polarity = torch.sign(adv).long()
        step = int(self.state.global_step)  # finished optimiser steps: the first update uses alpha0
        shaped = self.a3po_shape(adv, polarity, mask, logps, ent, step)
        out["advantages"] = shaped.adv
        if self.a3po_store is not None:  # the same on every rank: the gather below is collective
            # with vLLM, TRL keeps the sampler's log-probs: stored beside ours (the training-inference mismatch)
            sampler = out.get("sampling_per_token_logps")
            self._a3po_log(step, shaped, texts, local, correct, polarity, ids, mask, logps, ent, sampler)
        return out

    # ------------------------------------------------------------------ logging
    def _a3po_shard(self, step, shaped: Shaped, texts, inputs, correct, polarity, ids, mask, logps, ent, sampler=None):
        """This process's rows (rollouts, tokens), ready to gather."""
        B = mask.shape[0]
        G = max(1, int(self.num_generations))
        tok = self.processing_class

        def token_text(tid):
            return [
                tok.convert_tokens_to_string([t]) if t is not None else ""
                for t in tok.convert_ids_to_tokens(tid.tolist())
            ]

        prompts = [x.get("prompt") if isinstance(x.get("prompt"), str) else str(x.get("prompt")) for x in inputs]
        prompts = (prompts + [""] * B)[:B]
        answers = ([str(x.get("answer", "")) for x in inputs] + [""] * B)[:B]
        tables = step_tables(
            "pending",
            step + 1,
            mask=mask,
            token_ids=ids,
            logprob=logps,
            entropy=ent,
            adv_tokens_raw=shaped.adv_tokens_raw,
            adv_shaped=shaped.adv,
            is_key=shaped.key_mask,
            polarity=polarity,
            token_text=token_text,
            rollout_logprob=sampler,
            rollouts={
                "group_idx": (np.arange(B) // G).astype(np.int32),
                "prompt_idx": np.arange(B, dtype=np.int64) // G,
                "prompt": prompts,
                "response": texts,
                "answer": answers,
                "reward": np.array(correct, np.float32),
                "correct": [bool(c) for c in correct],
                "truncated": truncated_rows(ids, mask, self.args.max_completion_length, tok.eos_token_id),
                "adv_raw": shaped.adv_raw.float().cpu().numpy(),
            },
        )
        return {"tables": tables, "n_groups": -(-B // G)}

    def _a3po_log(self, step, shaped: Shaped, *shard_args):
        """Gather every process's shard and write them as one store step (main process)."""
        shards = gather_object([self._a3po_shard(step, shaped, *shard_args)])
        if not self.accelerator.is_main_process:
            return
        self._a3po_start_run()
        rid = self.a3po_run
        tables = merge_shards(rid, [s["tables"] for s in shards], [s["n_groups"] for s in shards])
        # every shard's push (Σ|Δadv|·(1−p)) comes from the merged token rows, as for a verl run
        metrics = metrics_from_rollouts(tables["rollouts"], tables["tokens"])
        metrics.update(
            alpha_pos=shaped.alpha_pos,
            alpha_neg=shaped.alpha_neg,
            trl_global_step=float(step),
        )
        self.a3po_store.write_step(rid, step + 1, tables, metrics=metrics)
        self.a3po_store.update_run(rid, last_step=step + 1)

    def train(self, *args, **kw):
        try:
            res = super().train(*args, **kw)
        except BaseException as e:
            if self.a3po_run is not None:
                self.a3po_store.update_run(
                    self.a3po_run,
                    status="failed" if isinstance(e, Exception) else "killed",
                    error=f"{type(e).__name__}: {e}",
                )
            raise
        if self.a3po_run is not None:
            self.a3po_store.update_run(self.a3po_run, status="finished")
        return res


def truncated_rows(ids: torch.Tensor, mask: torch.Tensor, max_len: int, eos_id: int | None) -> np.ndarray:
    """``(B,)`` bool: completions cut at ``max_len`` tokens, i.e. as long as allowed and not ended by EOS."""
    n = mask.sum(1)
    last = ids.gather(1, (n - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    ended = last == eos_id if eos_id is not None else torch.zeros_like(n, dtype=torch.bool)
    return ((n >= max_len) & ~ended).cpu().numpy()


def _set(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def merge_shards(run_id: str, shards: list[dict], n_groups: list[int]) -> dict[str, pa.Table]:
    """One step's tables from the per-process shards, rank order: rollout, group and prompt indices
    are offset so that every rollout of the step has its own index."""
    parts = {"rollouts": [], "tokens": []}
    r_off = g_off = 0
    for tabs, ng in zip(shards, n_groups):
        ro = tabs["rollouts"]
        n = ro.num_rows
        ro = _set(ro, "run_id", [run_id] * n)
        ro = _set(ro, "rollout_idx", pc.add(ro["rollout_idx"], r_off).to_numpy())
        ro = _set(ro, "group_idx", pc.add(ro["group_idx"], g_off).to_numpy())
        ro = _set(ro, "prompt_idx", pc.add(ro["prompt_idx"], g_off).to_numpy())
        parts["rollouts"].append(ro)
        tk = tabs.get("tokens")
        if tk is not None:
            tk = _set(tk, "run_id", [run_id] * tk.num_rows)
            parts["tokens"].append(_set(tk, "rollout_idx", pc.add(tk["rollout_idx"], r_off).to_numpy()))
        r_off += n
        g_off += ng
    return {k: pa.concat_tables(v) for k, v in parts.items() if v}
