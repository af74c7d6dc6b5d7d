"""The reference backend: Hugging Face ``model.generate`` on the policy itself (``rollout.backend=hf``).

Slowest of the three, but it is transformers' own sampler, so the other backends are checked
against it.
"""

from __future__ import annotations

import torch

from engine.rollout.base import Rollouts, SamplingParams, cut_at_eos, left_pad


class HFBackend:
    """Batched ``model.generate`` with KV cache on the policy itself (no weight copy to sync)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        device = next(self.model.parameters()).device
        rep = [p for p in prompts for _ in range(params.n)]
        ids, mask = left_pad(rep, self.tok.pad_token_id, device)
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(params.seed)
        kw = dict(
            do_sample=params.temperature > 0,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        if params.temperature > 0:
            kw.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        if was_training:
            self.model.train()
        resp, rmask, trunc = cut_at_eos(out[:, ids.shape[1] :], self.tok.eos_token_id, self.tok.pad_token_id)
        return Rollouts(ids, mask, resp, rmask, trunc)
