"""A rollout engine of our own for the Hugging Face path (``rollout.backend=kv``).

Why not ``model.generate``: it keeps stepping every row until the longest one ends, runs a stack of
generic logits processors and stopping criteria per token, and throws away the distribution it
sampled from, so the trainer has to run the whole batch through the model again to get the
old-policy log-probs. This engine

* prefills each left-padded prompt once into a KV cache (its ``n`` samples share the prefill: the
  cache rows are repeated, not recomputed), then runs one batched forward per new token on the rows
  still running;
* retires a row at its EOS: the active batch is compacted and the cache rows are gathered, so a
  finished row costs nothing afterwards;
* samples with the same semantics as transformers (temperature, then top-k, then top-p, with the
  same tie and keep-at-least-one rules; temperature 0 is greedy argmax), drawing by inverse CDF from
  its own ``torch.Generator``, so a seed reproduces a rollout whatever else touched the global RNG
  (the same distribution as transformers' ``multinomial``, not the same random stream);
* steps supported Llama-family models with ``engine.model.fast_forward.Decoder`` (stacked projections, a
  plain attention over this cache) and any other model with its own forward;
* records, for each sampled token, its log-prob and the entropy of the full distribution it was
  sampled from (``logits / temperature`` before top-k/top-p truncation), which is exactly what the
  trainer recomputes with ``response_logits(..., temperature)`` + ``token_logprobs``/``token_entropy``.

The cache: for plain full-attention models (the embedded Llama-style one) our own preallocated buffers, one
``(rows, heads, prompt + max_new_tokens, head_dim)`` tensor per layer for keys and values (stored
position-major, see ``_slot_layer_class``), written in place; retiring rows moves only the surviving
tail rows into the holes. Models with sliding-window or hybrid layers fall back to the model's own ``DynamicCache`` compacted with ``batch_select_indices``.
The preallocated one does not copy the whole cache every token (what grows quadratically with longer
responses), and on CPU its memory is kept from one ``generate`` to the next (``_Arena``) instead of
coming fresh, page by page, from the operating system each time. For supported models the prompts
are prefilled and stepped by ``fast_forward.Decoder``, which writes straight into these buffers.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from types import SimpleNamespace

import torch

from engine.errors import ConfigError
from engine.model import cpu_kernels
from engine.model.fast_forward import Decoder, sliding_window, unsupported_reason
from engine.model.workers import WorkerPool, chunk_seed, split
from engine.rollout.base import Rollouts, SamplingParams, cut_at_eos, left_pad, position_ids


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scores to sample from, as transformers' sampling warpers build them.

    Order and rules follow ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``
    with ``min_tokens_to_keep=1``: top-k keeps every token tied with the k-th score; top-p drops the
    ascending-sorted tokens whose cumulative probability is ``<= 1 - top_p`` and always keeps the
    most likely one. ``logits`` is ``(N, V)`` float; temperature must be > 0 here.
    """
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k and top_k > 0:
        k = min(max(int(top_k), 1), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``(N, V)`` probabilities (rows need not sum to 1), by inverse CDF.

    ``torch.multinomial`` does the same job with an exponential draw per vocabulary entry; this takes
    one uniform per row, a cumulative sum and a binary search (a third of the time per decode step on
    the embedded model). A zero-probability entry is never returned: the search finds the first entry
    whose cumulative sum exceeds ``u * total``, and the result is capped at the first entry where the
    cumulative sum reaches the total (it has a positive probability) in case ``u * total`` rounds up
    to the total."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype)
    tok = torch.searchsorted(cdf, u * total, right=True).squeeze(1)
    return torch.minimum(tok, (cdf < total).sum(-1))


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """One token per row from ``(N, V)`` logits; also its log-prob and the full-distribution entropy.

    Returns ``(tokens, logprob, entropy)``, each ``(N,)``. Log-prob and entropy refer to
    ``softmax(logits / T)`` (``softmax(logits)`` when greedy), before any truncation, in float32.
    """
    x = logits.float()
    full = x / params.temperature if params.temperature > 0 and params.temperature != 1.0 else x
    logp = torch.log_softmax(full, dim=-1)
    p = logp.exp()
    if params.temperature > 0:
        truncated = (params.top_k and params.top_k > 0) or (params.top_p is not None and params.top_p < 1.0)
        probs = warp_logits(x, params.temperature, params.top_k, params.top_p).softmax(-1) if truncated else p
        tok = draw(probs, generator)
    else:
        tok = x.argmax(-1)
    picked = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    # a -inf logit (a masked token) has p = 0 and contributes 0, not 0 * -inf
    ent = -(p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    return tok, picked, ent


class _Arena:
    """Memory that the slot cache reuses from one ``generate`` to the next (CPU only).

    Why: on the embedded workload the cache's buffers are about 15 MB per process, fresh from the
    operating system at every ``generate``, which zero-fills each page on first touch (about 3% of a
    generate). The arena keeps one flat buffer, sized to what the previous ``generate`` asked for, and
    hands out views of it; a request that does not fit gets an allocation of its own, and the next
    ``generate`` makes the flat buffer big enough to cover it. It never shrinks (``KVEngine.close``
    drops it)."""

    ALIGN = 16  # elements: every view starts 64-byte aligned (and at an even offset, for complex views)

    def __init__(self):
        self.flat: torch.Tensor | None = None
        self.used = self.need = 0
        self.kind = None  # (dtype, device) of the last request

    def begin(self) -> None:
        """Start a ``generate``: grow the flat buffer to what the last one asked for (its dtype and device)."""
        f = self.flat
        if self.need and (f is None or f.numel() < self.need or (f.dtype, f.device) != self.kind):
            self.flat = torch.empty(self.need, dtype=self.kind[0], device=self.kind[1])
        self.used = self.need = 0

    def take(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        size = math.prod(shape)
        n = -(-size // self.ALIGN) * self.ALIGN
        if (like.dtype, like.device) != self.kind:
            self.kind, self.need = (like.dtype, like.device), 0
        self.need += n
        f = self.flat
        if f is None or f.dtype != like.dtype or f.device != like.device or self.used + n > f.numel():
            return like.new_empty(shape)
        self.used += n
        return f[self.used - n : self.used - n + size].view(shape)


def _slot_layer_class():
    """A preallocated KV layer: one buffer per keys/values, written in place.

    ``kbuf``/``vbuf`` are ``(B, H, capacity, D)`` views (the layout transformers reads) of storage laid
    out position-major, ``(capacity, B, H, D)``: one decode step's keys of every row are one contiguous
    block, and the first ``length`` positions of the active rows are one contiguous stretch of memory,
    which the decode step's batched products (``fast_forward._attend_cache``) read through views.
    Row-major storage gave those products one separate block per row and head to fetch; on the embedded
    workload the cache outgrows the CPU's caches and that cost a sixth of a 64-row decode step at 31
    positions (4.0 ms row-major, 3.4 ms position-major; ``bench/bench_decode.py``: generation 0.91x
    on arith).

    The active rows are always the first ``k`` rows of the buffer. Retiring rows moves the last active
    rows into the holes (``retire``), so only the moved rows are copied, never the whole batch, and
    the attention sees ``buffer[:k, :, :length]`` (a view, no copy). ``fast_forward.Decoder`` writes
    its steps into ``kbuf``/``vbuf`` (``kc``: the keys as complex pairs) and calls ``sync``.
    """
    from transformers.cache_utils import DynamicLayer

    class _SlotLayer(DynamicLayer):
        def __init__(self, capacity: int, arena: _Arena | None = None):
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.active = 0
            self.arena = arena
            self.kc = None

        def _empty(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
            """An uninitialised ``(B, H, capacity, D)`` buffer stored position-major (see above)."""
            B, H, cap, D = shape
            store = (cap, B, H, D)
            flat = like.new_empty(store) if self.arena is None else self.arena.take(store, like)
            return flat.permute(1, 2, 0, 3)

        def _hold(self, kbuf: torch.Tensor, vbuf: torch.Tensor, active: int) -> None:
            self.kbuf, self.vbuf, self.active = kbuf, vbuf, active
            complex_ok = kbuf.dtype in (torch.float32, torch.float64) and kbuf.shape[-1] % 2 == 0
            self.kc = torch.view_as_complex(kbuf.unflatten(-1, (-1, 2))) if complex_ok else None
            self.sync()

        def sync(self) -> None:
            """Point ``keys``/``values`` (transformers' view of the layer) at the active rows' filled positions."""
            k, n = self.active, self.length
            self.keys, self.values = self.kbuf[:k, :, :n], self.vbuf[:k, :, :n]

        def reserve(self, rows: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
            """Empty buffers for ``rows`` rows (``fast_forward.Decoder.prefill`` fills them)."""
            shape = (rows, heads, self.capacity, head_dim)
            self.device = like.device
            self.length = 0
            self._hold(self._empty(shape, like), self._empty(shape, like), rows)
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            B, H, _, D = key_states.shape
            kbuf = self._empty((B, H, self.capacity, D), key_states)
            vbuf = self._empty((B, value_states.shape[1], self.capacity, value_states.shape[3]), value_states)
            self._hold(kbuf, vbuf, B)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            k, n, s = self.active, self.length, key_states.shape[-2]
            if n + s > self.capacity:
                raise RuntimeError(f"KV cache overflow: {n + s} > {self.capacity} positions")
            self.kbuf[:k, :, n : n + s] = key_states
            self.vbuf[:k, :, n : n + s] = value_states
            self.length = n + s
            self.sync()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def expand(self, n: int) -> None:
            """Each row becomes ``n`` consecutive rows (one prefill per prompt, ``n`` samples from it)."""
            k, L = self.active, self.length
            kbuf = self._empty((k * n, *self.kbuf.shape[1:]), self.kbuf)
            vbuf = self._empty((k * n, *self.vbuf.shape[1:]), self.vbuf)
            kbuf[:, :, :L] = self.kbuf[:k, :, :L].repeat_interleave(n, dim=0)
            vbuf[:, :, :L] = self.vbuf[:k, :, :L].repeat_interleave(n, dim=0)
            self._hold(kbuf, vbuf, k * n)

        def retire(self, holes: torch.Tensor, sources: torch.Tensor, active: int) -> None:
            """Copy rows ``sources`` into ``holes`` and keep the first ``active`` rows."""
            n = self.length
            if holes.numel():
                self.kbuf[holes, :, :n] = self.kbuf[sources, :, :n]
                self.vbuf[holes, :, :n] = self.vbuf[sources, :, :n]
            self.active = active
            self.sync()

    return _SlotLayer


def _cache_kwarg(model) -> str:
    """transformers 5 names the forward's cache argument ``cache``; 4.x calls it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _plain_attention(config) -> bool:
    """True when every layer is plain full attention (our slot cache does not model sliding windows)."""
    return not sliding_window(config)


def retire_order(done: torch.Tensor):
    """Compaction plan when the rows where ``done`` finish: ``(order, holes, sources)``.

    The surviving rows become the first ``a`` rows; finished rows inside that prefix (``holes``) are
    filled with the surviving rows beyond it (``sources``), so only those rows' cache is copied.
    ``order[i]`` is the old index of the row now at ``i`` (apply it to every per-row tensor)."""
    keep = (~done).nonzero().squeeze(1)
    a = keep.numel()
    order = torch.arange(a, device=done.device)
    holes = done[:a].nonzero().squeeze(1)
    sources = keep[keep >= a]
    order[holes] = sources
    return order, holes, sources


class _RowCache:
    """The decode loop's view of the cache: build it, and drop finished rows from it.

    ``slot``: our preallocated layers (plain full-attention models); otherwise the model's own
    ``DynamicCache``, compacted with ``batch_select_indices``.
    """

    def __init__(self, config, capacity: int, arena: _Arena | None = None):
        from transformers import DynamicCache
        from transformers.cache_utils import Cache

        self.slot = _plain_attention(config)
        if self.slot:
            try:
                layer = _slot_layer_class()
                self.cache = Cache(layers=[layer(capacity, arena) for _ in range(config.num_hidden_layers)])
            except (ImportError, TypeError, AttributeError):  # older transformers (no per-layer cache API)
                self.slot = False
        if not self.slot:
            try:
                self.cache = DynamicCache(config=config)  # knows sliding-window layers
            except TypeError:  # transformers 4.x: no config argument
                self.cache = DynamicCache()

    def expand(self, n: int) -> None:
        """Repeat every row ``n`` times, consecutively (prompt-major order)."""
        if n == 1:
            return
        if self.slot:
            for layer in self.cache.layers:
                layer.expand(n)
        else:
            self.cache.batch_repeat_interleave(n)

    def drop(self, done: torch.Tensor) -> torch.Tensor:
        """Remove the rows where ``done``; return the permutation to apply to per-row state
        (``retire_order``)."""
        if not self.slot:
            keep = (~done).nonzero().squeeze(1)
            self.cache.batch_select_indices(keep)
            return keep
        order, holes, sources = retire_order(done)
        for layer in self.cache.layers:
            layer.retire(holes, sources, order.numel())
        return order


class KVEngine:
    """Rollouts on the policy itself with a KV cache, EOS retirement and recorded log-probs.

    Same interface as ``HFBackend``; the returned ``Rollouts`` carry ``logprobs`` and ``entropy``.
    """

    records_logprobs = True  # the trainer may use them as the old policy's (same model, same weights)

    def __init__(
        self, model, tokenizer, fast: bool = True, workers: int = 1, threads: int | None = None, native: bool = True
    ):
        self.model = model
        self.tok = tokenizer
        self.fast = fast  # decode with engine.model.fast_forward when the model supports it (else the model's forward)
        # fast decoding on CPU: rotary, attention, norms and activation in engine.model.cpu_kernels' C kernels when they run
        # here; built now, before any worker process starts, so that the workers only load them
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        self.native = native and fast and on_cpu and cpu_kernels.library() is not None
        self.trace: list | None = None  # tests set a list: each step appends (original rows, logits)
        # workers > 1: CPU helper processes share the prompts (engine/model/workers.py), started on first use
        if workers > 1 and not on_cpu:
            raise ConfigError(
                f"config key 'rollout.workers' ({workers}) splits decoding between CPU processes, but the "
                "policy is on a GPU — set rollout.workers=1 (or rollout.backend=vllm)"
            )
        self.workers, self.threads = workers, threads or max(1, torch.get_num_threads() // max(1, workers))
        self.pool = None
        self.arena = _Arena()  # the KV cache's memory, kept between generates on CPU

    def sync_weights(self, model) -> None:
        if model is not self.model and self.pool is not None:  # helpers hold the old module: restart them
            self.close()
        self.model = model  # the engine runs the policy itself: nothing to copy

    def close(self) -> None:
        """Stop the worker processes, if any, and free the cache memory kept between generates."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.arena = _Arena()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        """``params.n`` responses per prompt, prompt-major, cut at the first EOS like ``cut_at_eos``."""
        if self.workers > 1 and len(prompts) > 1:
            if self.pool is None:
                self.pool = WorkerPool(self.model, self.workers, self.threads)
            ids = SimpleNamespace(eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            jobs = [
                (
                    _generate_share,
                    ids,
                    self.fast,
                    self.native,
                    prompts[share],
                    replace(params, seed=chunk_seed(params.seed, j)),
                )
                for j, share in enumerate(split(len(prompts), self.pool.workers))
            ]
            mine, theirs = self.pool.run(jobs, lambda job: self._generate(*job[-2:]))
            return Rollouts.concat([mine, *theirs], self.tok.pad_token_id)
        return self._generate(prompts, params)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        """One process's generation (all prompts, or one worker's share)."""
        model = self.model
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, self.tok.pad_token_id, device)  # one row per prompt: prefilled once
        was_training = model.training
        model.eval()
        try:
            gen, lp, ent = self._decode(ids, mask, params, device)
        finally:
            if was_training:
                model.train()
        n = params.n
        return self._pack(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), gen, lp, ent)

    def _decode(self, ids, mask, params: SamplingParams, device):
        """The token loop. Returns ``(B, T)`` tokens, log-probs and entropies (pad / 0 after a row's EOS)."""
        B, T, eos = ids.shape[0] * params.n, params.max_new_tokens, self.tok.eos_token_id
        generator = torch.Generator(device=device).manual_seed(int(params.seed))
        arena = self.arena if device.type == "cpu" else None  # GPU: the caching allocator already reuses memory
        if arena is not None:
            arena.begin()
        rc = _RowCache(self.model.config, ids.shape[1] + T, arena)
        kw = {_cache_kwarg(self.model): rc.cache, "use_cache": True}
        dec = (
            Decoder(self.model, rc.cache.layers, ids.shape[1] + T, native=self.native and device.type == "cpu")
            if self.fast and rc.slot and unsupported_reason(self.model) is None
            else None
        )
        ppos = position_ids(mask)
        if dec is not None:
            logits = dec.prefill(ids, mask, ppos)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=ppos, logits_to_keep=1, **kw).logits[
                :, -1
            ]
        # the n samples of a prompt share its prefill: repeat the cache rows, not the computation
        rc.expand(params.n)
        logits = logits.repeat_interleave(params.n, 0)
        att = mask.repeat_interleave(params.n, 0)
        rows = torch.arange(B, device=device)  # original row of each active row
        pos = att.long().sum(1)  # next position id of each active row
        L = ids.shape[1]  # cached positions
        if dec is not None:  # additive mask over every position the cache can hold: 0 = attend, -inf = left padding
            bias = torch.zeros((B, L + T), dtype=logits.dtype, device=device)
            bias[:, :L].masked_fill_(att == 0, float("-inf"))
        steps = []  # per step: (original rows, tokens, log-probs, entropies) of the rows that sampled
        for t in range(T):
            if self.trace is not None:
                self.trace.append((rows.clone(), logits.float().clone()))
            tok, tlp, tent = sample_tokens(logits, params, generator)
            steps.append((rows, tok, tlp, tent))
            done = tok == eos
            finished = int(done.sum())
            if finished == rows.numel() or t == T - 1:
                break
            if finished:
                order = rc.drop(done)
                rows, pos, tok = rows[order], pos[order], tok[order]
                if dec is None:
                    att = att[order]
                else:
                    bias = bias[order]
            L += 1
            if dec is not None:
                logits = dec.step(tok, pos, bias[:, :L])
            else:
                att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=1)
                logits = self.model(
                    input_ids=tok.unsqueeze(1), attention_mask=att, position_ids=pos.unsqueeze(1), **kw
                ).logits[:, -1]
            pos = pos + 1
        gen = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long, device=device)
        lp = torch.zeros((B, T), dtype=torch.float32, device=device)
        ent = torch.zeros((B, T), dtype=torch.float32, device=device)
        at = torch.cat([r for r, *_ in steps])
        col = torch.cat([torch.full_like(r, t) for t, (r, *_) in enumerate(steps)])
        gen[at, col] = torch.cat([x[1] for x in steps])
        lp[at, col] = torch.cat([x[2] for x in steps])
        ent[at, col] = torch.cat([x[3] for x in steps])
        return gen, lp, ent

    def _pack(self, ids, mask, gen, lp, ent) -> Rollouts:
        """Trim to the longest response; positions past a row's EOS are pad with mask 0 and log-prob 0."""
        resp, rmask, trunc = cut_at_eos(gen, self.tok.eos_token_id, self.tok.pad_token_id)
        keep = resp.shape[1]
        valid = rmask.bool()
        return Rollouts(
            ids,
            mask,
            resp,
            rmask,
            trunc,
            logprobs=torch.where(valid, lp[:, :keep], torch.zeros_like(lp[:, :keep])),
            entropy=torch.where(valid, ent[:, :keep], torch.zeros_like(ent[:, :keep])),
        )


def _generate_share(
    helper, ids, fast: bool, native: bool, prompts: list[list[int]], params: SamplingParams
) -> Rollouts:
    """A worker-pool job (``engine.model.workers``): one helper's share of the prompts, sampled by a kv engine of
    its own on the shared model (made on the helper's first share and kept, with its cache memory)."""
    engine = helper.cache.get("kv")
    if engine is None:
        engine = helper.cache["kv"] = KVEngine(helper.model, ids, fast=fast, native=native)
    return engine.generate(prompts, params)
