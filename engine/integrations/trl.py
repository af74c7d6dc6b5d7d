"""A3PO for TRL: a ``GRPOTrainer`` subclass that shapes per-token advantages and logs every token.

Why: users who scale out with TRL (accelerate: DDP, DeepSpeed ZeRO, FSDP) keep the same shaping
functions and the same store. TRL computes one advantage per completion; after it does, we run one
extra no-grad forward for the old-policy log-probs and entropies, apply the engine's
``polarity_weighting`` and ``token_shaping`` (A3PO's decaying asymmetric rules, or any token rules),
and hand TRL a ``(B, T)`` advantage tensor, which its loss accepts as is.

    from engine.integrations.trl import A3POGRPOTrainer
    trainer = A3POGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=ds,
                              a3po={"alpha_pos": 2.0, "alpha_neg": 2.0, "decay": "linear"}, store="runs")
    trainer.train()

    accelerate launch examples/trl_a3po.py          # multi-GPU

Polarity is the verifier's verdict when the dataset has an ``answer`` column, else the sign of
TRL's advantage (the same thing for 0/1 rewards in mixed groups).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from trl import GRPOTrainer

from engine.advantage import a3po_rules, polarity_weighting, token_shaping
from engine.reward import is_correct
from engine.store import Store, step_tables

A3PO_DEFAULTS = {"ratio": 0.2, "alpha_pos": 2.0, "alpha_neg": 2.0, "decay": "linear", "rate": 5.0, "w_pos": 1.0, "w_neg": 1.0}


class A3POGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, a3po: dict | None = None, store: str | Store | None = None, run_name: str | None = None, **kw):
        unknown = set(a3po or {}) - set(A3PO_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown A3PO option(s) {sorted(unknown)}; known: {sorted(A3PO_DEFAULTS)}")
        super().__init__(*args, **kw)
        self.a3po = {**A3PO_DEFAULTS, **(a3po or {})}
        self.a3po_store = Store(store) if isinstance(store, str) else store
        self.a3po_run = None
        if self.a3po_store is not None and self.accelerator.is_main_process:
            cfg = {"algorithm": {"name": "a3po", **self.a3po}, "train": {"steps": int(self.args.max_steps)},
                   "integration": "trl", "trl_args": {k: str(v) for k, v in self.args.to_dict().items()}}
            self.a3po_run = self.a3po_store.create_run(cfg, name=run_name)
            self.a3po_store.update_run(self.a3po_run, status="running")
        self._a3po_calls = 0

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids, mask = out["completion_ids"], out["completion_mask"]
        full_ids = torch.cat([out["prompt_ids"], ids], dim=1)
        full_mask = torch.cat([out["prompt_mask"], mask], dim=1)
        with torch.no_grad():
            logps, ent, _ = self._get_per_token_logps_and_entropies(self.model, full_ids, full_mask, ids.size(1),
                                                                     compute_entropy=True)
        adv = out["advantages"]
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        local = inputs[: len(texts)] if len(inputs) >= len(texts) else inputs
        if all("answer" in x for x in local) and len(local) == len(texts):
            correct = [is_correct(t, str(x["answer"])) for t, x in zip(texts, local)]
            polarity = torch.tensor([1 if c else -1 for c in correct], device=adv.device)
        else:
            correct = (adv > 0).tolist()
            polarity = torch.sign(adv).long()
        step = int(self.state.global_step)
        total = int(self.args.max_steps) if self.args.max_steps and self.args.max_steps > 0 else max(1, step + 1)
        a = self.a3po
        rules = a3po_rules(step, total, ratio=a["ratio"], alpha_pos=a["alpha_pos"], alpha_neg=a["alpha_neg"],
                           decay=a["decay"], rate=a["rate"])
        tok_adv = adv.unsqueeze(-1) * mask.to(adv.dtype)
        tok_adv = polarity_weighting(tok_adv, polarity, w_pos=a["w_pos"], w_neg=a["w_neg"])
        shaped, key = token_shaping(tok_adv, mask, polarity, rules, logprobs=logps, entropy=ent)
        out["advantages"] = shaped
        if self.a3po_run is not None:
            self._a3po_log(step, texts, local, correct, polarity, adv, tok_adv, shaped, key, ids, mask, logps, ent)
        self._a3po_calls += 1
        return out

    def _a3po_log(self, step, texts, inputs, correct, polarity, adv, tok_raw, shaped, key, ids, mask, logps, ent):
        """Write this generation batch (main process) as one store step in the engine's schema."""
        rid, B = self.a3po_run, mask.shape[0]
        G = max(1, int(self.num_generations))
        tok = self.processing_class

        def token_text(tid):
            return [tok.convert_tokens_to_string([t]) if t is not None else "" for t in tok.convert_ids_to_tokens(tid.tolist())]

        prompt = [x.get("prompt") if isinstance(x.get("prompt"), str) else str(x.get("prompt")) for x in inputs] or [""] * B
        tables = step_tables(
            rid, self._a3po_calls + 1, mask=mask, token_ids=ids, logprob=logps, entropy=ent, adv_tokens_raw=tok_raw,
            adv_shaped=shaped, is_key=key, polarity=polarity, token_text=token_text,
            rollouts={"group_idx": (np.arange(B) // G).astype(np.int32), "prompt_idx": np.arange(B, dtype=np.int64) // G,
                      "prompt": prompt[:B], "response": texts, "answer": [str(x.get("answer", "")) for x in inputs][:B],
                      "reward": np.array(correct, np.float32), "correct": [bool(c) for c in correct],
                      "truncated": np.zeros(B, bool), "adv_raw": adv.float().cpu().numpy()})
        m = mask.bool().cpu()
        lengths = m.sum(1).numpy()
        mk = m.float()
        e = ent.float().cpu()
        steps = pa.table({"run_id": [rid], "step": pa.array([self._a3po_calls + 1], pa.int32()),
                          "reward": [float(np.mean(correct))], "acc": [float(np.mean(correct))],
                          "entropy": [float((e * mk).sum() / mk.sum().clamp(min=1))], "length": [float(lengths.mean())],
                          "trl_global_step": [float(step)]})
        self.a3po_store.write_step(rid, self._a3po_calls + 1, {**tables, "steps": steps})
        self.a3po_store.update_run(rid, last_step=self._a3po_calls + 1)

    def train(self, *args, **kw):
        try:
            res = super().train(*args, **kw)
        except BaseException as e:
            if self.a3po_run is not None:
                self.a3po_store.update_run(self.a3po_run, status="failed" if isinstance(e, Exception) else "killed",
                                           error=f"{type(e).__name__}: {e}")
            raise
        if self.a3po_run is not None:
            self.a3po_store.update_run(self.a3po_run, status="finished")
        return res
