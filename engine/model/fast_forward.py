"""Our own forward for Llama-family decoders: no padding, and each prompt computed once per group.

Why: in an RL update every prompt appears ``G`` times (its group's samples) and the batch is padded
to its longest prompt and response. On the embedded workload the forward/backward therefore spends
about 40% of its token work on copies of prompts and on padding. The model's own ``forward`` cannot
avoid either: it takes a rectangular ``(B, L)`` batch. Here the same modules run on

* the *unique* prompts of the mini-batch (``torch.unique`` over the masked prompt rows), their real
  tokens only;
* every row's real response tokens but its last (it predicts nothing, and causal attention lets no
  earlier token see it).

Norms, projections and MLPs run on the packed ``(tokens, hidden)`` matrix. Only attention needs a
rectangle: prompt queries attend causally within their prompt; response queries attend to their
prompt's keys/values (gathered from the unique prompts, so the backward sums the ``G`` gradients into
the one prompt computation) and causally to their own response. The math is the model's: its own
embedding, norms, output/down projections and cos/sin (every rope type transformers implements);
its q/k/v and gate/up weights stacked into one product each; the rotate-half rotary embedding the four
families share, done as one complex product (q/k weight rows reordered so that each rotated pair of
dims sits side by side, ``_pairs``: q . k is unchanged); softmax attention with the module's ``scaling``. Logits agree with ``model(...)`` to
float rounding (tests/test_fast_forward.py, fp32: < 1e-5, and the gradients too).

It also provides the ``kv`` engine's prefill and one-token step (``Decoder``): fused projections and
a plain batched-product attention over the engine's position-major cache (at one query per row the
CPU's fused attention kernel costs more than the rest of a layer).

Supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` with full attention on every layer.
Anything else (sliding windows, other architectures, gradient checkpointing, attention dropout) uses
the model's own forward; ``model.fast_forward=false`` forces that everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model import cpu_kernels

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def sliding_window(cfg) -> bool:
    """True when some layer of a model with this config attends through a sliding window.

    transformers 5 marks such layers in ``layer_types``; older configs only set ``sliding_window``
    (Qwen2 gates it with ``use_sliding_window``). Mistral's modeling applies ``sliding_window`` to every
    layer and never reads ``layer_types``, so there a window counts whatever ``layer_types`` says."""
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return True
    window = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    return bool(window and (types is None or getattr(cfg, "model_type", None) == "mistral"))


def unsupported_reason(model) -> str | None:
    """None when ``model`` can run here; else why not (one phrase)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        return f"model_type {mt!r} is not one of {', '.join(SUPPORTED)}"
    ckpt = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, ckpt, False):
        return "gradient checkpointing is on"
    if getattr(cfg, "attention_dropout", 0.0):  # the model drops attention weights in training; we do not
        return "attention dropout is on"
    if sliding_window(cfg):
        return "the model uses sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the Llama module layout"
    return None


def _heads(attn) -> tuple[int, int, int]:
    """``(H, KV, D)``: query heads, key/value heads and head size of an attention module."""
    D = attn.head_dim
    return attn.q_proj.weight.shape[0] // D, attn.k_proj.weight.shape[0] // D, D


def _pairs(D: int, device) -> torch.Tensor:
    """The head-dim order ``[0, D/2, 1, D/2 + 1, ...]``: rotate-half's partner dims made adjacent.

    Rotate-half rotary embedding (llama, mistral, qwen2, qwen3) turns dims ``i`` and ``i + D/2`` of a head
    as one complex number. With the q and k weight rows of each head reordered like this, every pair sits
    side by side and the rotary embedding is one complex product. Scores ``q . k`` do not change when q
    and k are permuted alike, and values are not permuted, so the attention output is the model's."""
    h = D // 2
    return torch.stack([torch.arange(h, device=device), torch.arange(h, D, device=device)], 1).flatten()


def _rotation(inner, ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's own rotary cos/sin for positions ``pos`` ``(N,)`` as ``cos + i sin``, ``(N, 1, D/2)`` complex.

    All four families build cos/sin as two equal halves (``cat(freqs, freqs)``), so the first half is
    the whole table. Made in float32 (float64 for float64 models); ``ref`` gives the device."""
    dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    cos, sin = inner.rotary_emb(ref.new_empty((1, 1), dtype=dt), pos[None])
    h = cos.shape[-1] // 2
    return torch.complex(cos[0, :, :h], sin[0, :, :h])[:, None]


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``(N, heads, D)`` in ``_pairs`` order by ``rot`` ``(N, 1, D/2)``: one complex
    product (in float32 for half-precision inputs, cast back)."""
    xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = torch.view_as_real(torch.view_as_complex(xc.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _qkv(h: torch.Tensor, w_qkv, heads, norms, rot):
    """Packed hidden states ``(N, C)`` -> rotated queries and keys ``(N, H + KV, D)`` and values ``(N, KV, D)``.

    One product with the q/k/v weights stacked (``w_qkv = (w, b)`` from ``_stacked``: q and k in
    ``_pairs`` order), the per-head q/k norms where the family has them (``norms``, Qwen3), and the
    rotary embedding on queries and keys together."""
    H, KV, D = heads
    qkv = F.linear(h, *w_qkv).view(h.shape[0], H + 2 * KV, D)
    return _rotate(_normed_qk(qkv[:, : H + KV], H, norms), rot), qkv[:, H + KV :]


def _normed_qk(qk: torch.Tensor, H: int, norms) -> torch.Tensor:
    """Query/key heads ``(N, H + KV, D)`` through Qwen3's per-head q/k norms (``norms``; None: as they are)."""
    if norms is None:
        return qk
    return torch.cat([_rms(qk[:, :H], norms[0], norms[1]), _rms(qk[:, H:], norms[2], norms[3])], dim=1)


def _qk_rows(heads, device) -> torch.Tensor:
    """Row order of the stacked q/k/v weight: q and k rows in ``_pairs`` order within each head, v as is."""
    H, KV, D = heads
    within = _pairs(D, device)
    qk = (torch.arange(H + KV, device=device)[:, None] * D + within).flatten()
    return torch.cat([qk, torch.arange((H + KV) * D, (H + 2 * KV) * D, device=device)])


def _stacked(attn):
    """The q/k/v weights (and biases) stacked for one product, q/k rows in ``_pairs`` order: ``(w, b)``."""
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    rows = _qk_rows(_heads(attn), w.device)
    b = None
    if attn.q_proj.bias is not None:
        b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])[rows]
    return w[rows], b


def _qk_norms(attn):
    """Qwen3's per-head q/k norms as ``(q_weight, q_eps, k_weight, k_eps)`` in ``_pairs`` order; None for
    the other families."""
    if not hasattr(attn, "q_norm"):
        return None
    order = _pairs(attn.head_dim, attn.q_norm.weight.device)
    qn, kn = attn.q_norm, attn.k_norm
    return qn.weight[order], qn.variance_epsilon, kn.weight[order], kn.variance_epsilon


def _stacked_mlp(mlp):
    """The gate and up weights (and biases, Llama's ``mlp_bias``) stacked for one product: ``(w, b)``."""
    b = None
    if mlp.gate_proj.bias is not None:
        b = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), b


def _act(mlp):
    """The MLP's activation; plain ``F.silu`` for SiLU (the four families' choice), skipping a module call.
    transformers 5 builds ``hidden_act="silu"`` as its own ``SiLUActivation`` (forward: ``F.silu``), older
    versions and ``"swish"`` as ``torch.nn.SiLU``: both count."""
    act = mlp.act_fn
    hf_silu = type(act).__name__ == "SiLUActivation" and type(act).__module__ == "transformers.activations"
    return F.silu if isinstance(act, torch.nn.SiLU) or hf_silu else act


def _gated(h: torch.Tensor, w_gu, act) -> torch.Tensor:
    """The gated MLP's inner activation ``act(gate h) * up h``, gate and up as one product (``w_gu = (w, b)``)."""
    g, u = F.linear(h, *w_gu).chunk(2, -1)
    return act(g) * u


def _mlp(h: torch.Tensor, w_gu, act, w_down) -> torch.Tensor:
    """The gated MLP, ``down(act(gate h) * up h)`` (``w_down = (w, b)``)."""
    return F.linear(_gated(h, w_gu, act), *w_down)


def _wb(linear) -> tuple:
    """A linear module's ``(weight, bias)``."""
    return linear.weight, linear.bias


def _attend(q, k, v, mask, bias, scale):
    """Softmax attention. q ``(B, H, Tq, D)``, k/v ``(B, KV, Tk, D)``; ``mask`` ``(B, 1, Tq, Tk)`` boolean
    (True = attend), ``bias`` the same as an additive ``(B * H, Tq, Tk)`` float32 tensor, or None.

    With ``bias`` (float32 on CPU): a batched product and a softmax. At the short lengths of CPU runs
    the CPU's fused attention kernel, forward and backward, is the slower of the two. Otherwise (GPU,
    half precision) ``scaled_dot_product_attention`` with the boolean mask: its fused kernels keep the
    scores out of memory and accumulate in float32."""
    B, H, Tq, D = q.shape
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
    if k.shape[1] != H:  # grouped-query attention: each key/value head serves H / KV query heads
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    Tk = k.shape[2]
    s = torch.baddbmm(bias, q.reshape(B * H, Tq, D), k.reshape(B * H, Tk, D).transpose(1, 2), alpha=scale)
    return torch.bmm(s.softmax(-1), v.reshape(B * H, Tk, D)).view(B, H, Tq, D)


class _Layout:
    """Where each input token of a mini-batch lives in the packed matrix, and the attention masks.

    Packed order: the unique prompts' real tokens (row-major), then every row's response tokens but
    its last one. The last response token predicts nothing here and no query that counts sees it
    (causal attention), so it is never computed. ``U`` unique prompts of width ``Lp``; ``B`` rows with
    responses of width ``T`` (response inputs: width ``Ti = T - 1``).
    """

    def __init__(self, prompt_ids, prompt_mask, response_ids, response_mask):
        dev = prompt_ids.device
        pm, rm = prompt_mask.bool(), response_mask.bool()
        key = prompt_ids.masked_fill(~pm, -1)
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)
        self.inv = inv  # (B,) row -> its unique prompt
        upm = uniq >= 0  # (U, Lp): the unique prompts' masks (same left padding as their rows)
        self.U, self.Lp = upm.shape
        self.B, self.T = rm.shape
        self.Ti = self.T - 1
        rin = rm[:, 1:]  # response inputs: a token is one when a next response token follows it
        self.p_idx = upm.flatten().nonzero().squeeze(1)  # flat (U*Lp) index of each packed prompt token
        self.i_idx = rin.flatten().nonzero().squeeze(1)  # flat (B*Ti) index of each packed response input
        self.r_idx = rm.flatten().nonzero().squeeze(1)  # flat (B*T) index of each predicted response token
        self.Np = self.p_idx.numel()
        # one scatter fills both rectangles: prompts at [0, U*Lp), response inputs after
        self.idx = torch.cat([self.p_idx, self.U * self.Lp + self.i_idx])
        p_len = upm.sum(1)
        # position ids: 0.. within each prompt; responses continue after their prompt
        p_pos = upm.long().cumsum(1) - 1
        r_pos = p_len[inv].unsqueeze(1) + torch.arange(self.Ti, device=dev)
        self.pos = torch.cat([p_pos.flatten()[self.p_idx], r_pos.flatten()[self.i_idx]])
        self.ids = torch.cat([uniq.flatten()[self.p_idx], response_ids[:, : self.Ti].flatten()[self.i_idx]])
        # prompt queries: causal within the prompt; a padding query attends to itself (its output is dropped)
        eye_p = torch.eye(self.Lp, dtype=torch.bool, device=dev)
        causal_p = torch.ones(self.Lp, self.Lp, dtype=torch.bool, device=dev).tril()
        self.p_mask = ((causal_p & upm[:, None, :]) | eye_p)[:, None]
        # response queries: their prompt's real tokens, then causal within the response
        causal_r = torch.ones(self.Ti, self.Ti, dtype=torch.bool, device=dev).tril()
        r_self = (causal_r & rin[:, None, :]) | torch.eye(self.Ti, dtype=torch.bool, device=dev)
        self.r_mask = torch.cat([upm[inv][:, None, :].expand(-1, self.Ti, -1), r_self], dim=2)[:, None]
        self._bias: dict = {}

    def biases(self, heads: int, dtype):
        """The two masks as additive ``(rows * heads, Tq, Tk)`` biases for ``_attend`` (made once per forward);
        ``(None, None)`` off CPU or below float32, where ``_attend`` uses the fused kernel instead."""
        if self.p_mask.device.type != "cpu" or dtype != torch.float32:
            return None, None
        if heads not in self._bias:

            def add(mask):
                rows, _, tq, tk = mask.shape
                b = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
                return b.expand(rows, heads, tq, tk).reshape(rows * heads, tq, tk)

            self._bias[heads] = (add(self.p_mask), add(self.r_mask))
        return self._bias[heads]

    def grids(self, x: torch.Tensor):
        """Packed ``(n, *rest)`` -> zero-padded ``(U, Lp, *rest)`` prompts and ``(B, Ti, *rest)`` response inputs."""
        out = x.new_zeros((self.U * self.Lp + self.B * self.Ti, *x.shape[1:])).index_copy(0, self.idx, x)
        p, r = out.split([self.U * self.Lp, self.B * self.Ti])
        return p.view(self.U, self.Lp, *x.shape[1:]), r.view(self.B, self.Ti, *x.shape[1:])

    def packed(self, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The inverse of ``grids``: ``(U, Lp, *rest)`` and ``(B, Ti, *rest)`` -> packed ``(n, *rest)``."""
        flat = torch.cat([p.flatten(0, 1), r.flatten(0, 1)])
        return flat.index_select(0, self.idx)


def _attention(attn, h, rot, lay: _Layout):
    """One attention block on packed ``(N, C)`` hidden states; returns ``(N, C)`` (after ``o_proj``)."""
    H, KV, D = heads = _heads(attn)
    qkv = torch.cat(_qkv(h, _stacked(attn), heads, _qk_norms(attn), rot), dim=1)  # (N, H + 2 KV, D)
    p_bias, r_bias = lay.biases(H, qkv.dtype)
    # (rows, heads, width, D) rectangles of the prompt part and of the response part
    pg, rg = lay.grids(qkv)
    pq, pk, pv = pg.transpose(1, 2).split([H, KV, KV], dim=1)
    rq, rk, rv = rg.transpose(1, 2).split([H, KV, KV], dim=1)
    po = _attend(pq, pk, pv, lay.p_mask, p_bias, attn.scaling)  # (U, H, Lp, D)
    # each row sees its own prompt's keys, computed once
    keys = torch.cat([pk.index_select(0, lay.inv), rk], dim=2)
    vals = torch.cat([pv.index_select(0, lay.inv), rv], dim=2)
    ro = _attend(rq, keys, vals, lay.r_mask, r_bias, attn.scaling)  # (B, H, Ti, D)
    return attn.o_proj(lay.packed(po.transpose(1, 2).flatten(2), ro.transpose(1, 2).flatten(2)))


def response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """Logits that predict each response token, ``(B, T, V)``; zeros where ``response_mask`` is 0.

    prompt_ids/prompt_mask ``(B, Lp)`` left-padded, response_ids/response_mask ``(B, T)`` right-padded
    (the ``Rollouts`` layout). Rows with the same prompt share one prompt computation. Differentiable.
    """
    lay = _Layout(prompt_ids, prompt_mask, response_ids, response_mask)
    inner = model.model
    x = inner.embed_tokens(lay.ids)  # (N, C)
    rot = _rotation(inner, x, lay.pos)
    for layer in inner.layers:
        mlp = layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        x = x + _attention(layer.self_attn, _rms(x, ln1.weight, ln1.variance_epsilon), rot, lay)
        x = x + _mlp(_rms(x, ln2.weight, ln2.variance_epsilon), _stacked_mlp(mlp), _act(mlp), _wb(mlp.down_proj))
    # hidden states that predict: prompt's last token (t = 0), response inputs 0..T-2 (t >= 1)
    p_grid, r_grid = lay.grids(x)
    pred = torch.cat([p_grid[:, -1].index_select(0, lay.inv).unsqueeze(1), r_grid], dim=1)  # (B, T, C)
    logits = model.lm_head(
        _rms(pred.flatten(0, 1).index_select(0, lay.r_idx), inner.norm.weight, inner.norm.variance_epsilon)
    )
    out = logits.new_zeros((lay.B * lay.T, logits.shape[-1])).index_copy(0, lay.r_idx, logits)
    return out.view(lay.B, lay.T, -1)


class _RMSNorm(torch.autograd.Function):
    """transformers' RMSNorm in float32, ``w * x * rsqrt(mean(x^2) + eps)`` (the same kernels, so the same
    numbers), with a hand-written backward: five kernels where autograd's chain of pow / mean / rsqrt /
    mul nodes runs about twice as many. ``dx = r (g w - x^ mean(g w x^))``, ``dw = sum(g x^)``, with
    ``x^ = x r`` and ``r = rsqrt(mean(x^2) + eps)``."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        xh = x * r
        ctx.save_for_backward(xh, r, w)
        return xh * w

    @staticmethod
    def backward(ctx, gy):
        xh, r, w = ctx.saved_tensors
        gw = (gy * xh).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gxh = gy * w
        gx = gxh.sub_(xh * (gxh * xh).mean(-1, keepdim=True)).mul_(r) if ctx.needs_input_grad[0] else None
        return gx, gw, None


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen RMSNorm: normalise in float32, cast back, scale (float32: ``_RMSNorm``,
    or its forward's kernels without the autograd node when no gradient is recorded, as in decoding)."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        if not torch.is_grad_enabled():
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * w
        return _RMSNorm.apply(x, w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# rope types whose cos/sin depend on the position only (not on the sequence length seen so far)
_STATIC_ROPE = ("default", "linear", "llama3")


class Decoder:
    """One-token steps of the kv engine for a supported model: fused projections, plain attention.

    The keys/values live in the engine's preallocated cache (``layers``: its slot layers, each with
    ``kbuf``/``vbuf`` ``(rows, KV, capacity, D)`` buffers whose first ``length`` positions are filled,
    and ``kc``, the keys as a complex view for float32/float64 buffers). A step writes the active rows'
    new key/value at position ``length`` and advances it.
    Why not the model's forward: per step it rebuilds masks and position embeddings through generic
    layers and runs three q/k/v and two gate/up products where one each will do; and its attention
    (CPU's fused kernel with a mask) costs more than the rest of the layer at one query per row. A
    batched matrix product against the cache, an additive mask and a softmax are several times
    cheaper there. At this size the Python and dispatch around each kernel are a quarter to a third
    of a step, so a step issues as few operations as it can: everything it reads is looked up once
    here (the stacked weights already transposed for ``mm``/``addmm``, biases, norm epsilons, head
    counts and, for rope types that depend on the position only, the cos/sin of every position up to
    ``max_positions``);
    the rotated keys are written into the cache by the rotary product itself (``out=``); the cache is
    read through views, never copied; the gated MLP's activation runs in place. Weights are
    read when the ``Decoder`` is made (one ``generate``: they do not change inside it).
    ``native`` (the kv engine's ``rollout.native_kernels`` on CPU): each step's rotary embedding and cache
    write, its attention over the cache, and every norm and gated activation run in ``engine.model.cpu_kernels``'
    C kernels, one call each instead of a chain of small torch kernels; where a tensor does not fit them
    (not float32, a head size that is not a multiple of 8, Qwen3's q/k norms before the rotary) the torch
    route above runs instead.
    """

    def __init__(self, model, layers, max_positions: int, native: bool = False):
        inner = model.model
        self.model, self.inner, self.cache = model, inner, layers
        self.native = native  # engine.model.cpu_kernels for rotary and cache write, attention, norms, activation
        self.plan = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            (w_qkv, b_qkv), (w_gu, b_gu) = _stacked(a), _stacked_mlp(mlp)
            self.plan.append(
                (
                    (ln1.weight, ln1.variance_epsilon),
                    (w_qkv.t(), b_qkv),
                    _qk_norms(a),
                    _heads(a),
                    a.scaling,
                    (a.o_proj.weight.t(), a.o_proj.bias),
                    (ln2.weight, ln2.variance_epsilon),
                    (w_gu.t(), b_gu),
                    _act(mlp),
                    (mlp.down_proj.weight.t(), mlp.down_proj.bias),
                )
            )
        self.final = (inner.norm.weight, inner.norm.variance_epsilon)
        emb = inner.embed_tokens.weight
        self.table = None
        if getattr(inner.rotary_emb, "rope_type", "default") in _STATIC_ROPE:
            with torch.no_grad():
                self.table = _rotation(inner, emb, torch.arange(max_positions, device=emb.device))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts ``ids`` ``(B, P)`` (``mask``: 1 on real tokens; ``pos``: their position
        ids) into the empty cache, which then holds ``P`` positions of ``B`` rows. Returns the last
        position's logits ``(B, V)``. The layers of ``step`` with ``P`` queries per row, causal over the
        row's real tokens; a padding query sees only itself (its output is never read, but must not be
        NaN: its key and value sit in the cache under a -inf mask)."""
        B, P = ids.shape
        x = self.inner.embed_tokens(ids).flatten(0, 1)  # (B P, C)
        flat = pos.flatten()
        rot = self.table[flat] if self.table is not None else _rotation(self.inner, x, flat)  # (B P, 1, D/2)
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        seen = (mask.bool()[:, None, :] & eye.logical_not().tril()) | eye  # (B, P queries, P keys)
        bias = torch.zeros(seen.shape, dtype=x.dtype, device=x.device).masked_fill_(~seen, float("-inf"))
        biases = {}  # per key/value head count: the mask repeated over a group's query heads
        for ((w1, e1), w_qkv, qkn, heads, scale, *tail), c in zip(self.plan, self.cache):
            H, KV, D = heads
            R = H // KV  # query heads per key/value head
            qkv = _qkv_rows(x, w1, e1, w_qkv, heads, self.native)
            qk = _normed_qk(qkv[:, : H + KV], H, qkn)
            c.reserve(B, KV, D, x)
            if c.kc is not None:  # float32/64: the rotary product writes the keys straight into the cache
                qc = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
                q = torch.view_as_real(qc[:, :H] * rot).flatten(-2)
                r = rot.view(B, P, 1, D // 2).transpose(1, 2)
                torch.mul(qc[:, H:].view(B, P, KV, D // 2).transpose(1, 2), r, out=c.kc[:B, :, :P])
            else:
                qk = _rotate(qk, rot)
                q = qk[:, :H]
                c.kbuf[:B, :, :P] = qk[:, H:].view(B, P, KV, D).transpose(1, 2)
            c.vbuf[:B, :, :P] = qkv[:, H + KV :].view(B, P, KV, D).transpose(1, 2)
            c.length = P
            # queries grouped by key/value head: (B KV, R P, D)
            q = q.reshape(B, P, KV, R, D).permute(0, 2, 3, 1, 4).reshape(B * KV, R * P, D)
            if KV not in biases:
                biases[KV] = bias[:, None, None].expand(B, KV, R, P, P).reshape(B * KV, R * P, P)
            o = _attend_cache(q, c, biases[KV], P, scale)
            o = o.view(B, KV, R, P, D).permute(0, 3, 1, 2, 4).reshape(B * P, H * D)
            x = _out_and_mlp(x, o, *tail, native=self.native)
        for c in self.cache:
            c.sync()
        return self.model.lm_head(_decode_norm(x.view(B, P, -1)[:, -1].contiguous(), *self.final, self.native))

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Append the active rows' tokens ``tok`` at positions ``pos`` (both ``(N,)``); ``bias``: ``(N, L)``
        additive mask (0 or -inf) over the cached positions including the new one. Returns ``(N, V)`` logits.
        ``prefill``'s layers for one query per row, written out without its reshapes: at this size each
        extra operation per layer shows (the general form measured about 1.04x the generate time)."""
        N, L = bias.shape
        x = self.inner.embed_tokens(tok)  # (N, C); module calls at both ends keep their hooks
        rot = self.table[pos] if self.table is not None else _rotation(self.inner, x, pos)
        biases = {}  # per key/value head count: the mask as (N * KV, 1, L), broadcast over a group's query heads
        for ((w1, e1), w_qkv, qkn, heads, scale, *tail), c in zip(self.plan, self.cache):
            H, KV, D = heads
            qkv = _qkv_rows(x, w1, e1, w_qkv, heads, self.native)
            n = c.length
            # queries rotated, new keys rotated into the cache and values copied there: one kernel, or torch's ops
            q = cpu_kernels.rope_append(qkv, rot, c.kbuf, c.vbuf, n) if self.native and qkn is None else None
            if q is None:
                qk = _normed_qk(qkv[:, : H + KV], H, qkn)
                if c.kc is not None:
                    qc = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
                    q = torch.view_as_real(qc[:, :H] * rot).view(N * KV, H // KV, D)
                    torch.mul(qc[:, H:], rot, out=c.kc[:N, :, n])
                else:
                    qk = _rotate(qk, rot)
                    q = qk[:, :H].reshape(N * KV, H // KV, D)
                    c.kbuf[:N, :, n] = qk[:, H:]
                c.vbuf[:N, :, n] = qkv[:, H + KV :]
            c.length = n + 1
            o = (
                cpu_kernels.decode_attention(q, c.kbuf[:N, :, :L], c.vbuf[:N, :, :L], bias, scale)
                if self.native
                else None
            )
            if o is None:
                if KV not in biases:
                    biases[KV] = bias[:, None, None].expand(N, KV, 1, L).reshape(N * KV, 1, L)
                o = _attend_cache(q, c, biases[KV], L, scale)
            x = _out_and_mlp(x, o.view(N, H * D), *tail, native=self.native)
        for c in self.cache:
            c.sync()
        return self.model.lm_head(_decode_norm(x, *self.final, self.native))


def _decode_norm(x: torch.Tensor, w: torch.Tensor, eps: float, native: bool) -> torch.Tensor:
    """Decoding's RMSNorm of ``(n, C)`` rows: ``engine.model.cpu_kernels``' one-pass kernel when ``native`` (and the
    rows fit it), else ``_rms``'s chain of kernels."""
    out = cpu_kernels.rmsnorm(x, w, eps) if native else None
    return _rms(x, w, eps) if out is None else out


def _qkv_rows(x: torch.Tensor, w1, e1, w_qkv, heads, native: bool) -> torch.Tensor:
    """A decoder layer's input norm and stacked q/k/v product on ``(n, C)`` rows: ``(n, H + 2 KV, D)`` (Qwen3's
    q/k norms, where the family has them, are the caller's: ``_normed_qk``)."""
    H, KV, D = heads
    return _product(_decode_norm(x, w1, e1, native), *w_qkv).view(x.shape[0], H + 2 * KV, D)


def _attend_cache(q: torch.Tensor, c, bias: torch.Tensor, L: int, scale: float) -> torch.Tensor:
    """Softmax attention of ``q`` ``(rows KV, m, D)`` over the first ``L`` positions of slot layer ``c``'s
    cache, read in place through views of its position-major storage; ``bias`` ``(rows KV, m or 1, L)``
    additive. Returns ``(rows KV, m, D)``."""
    rows = q.shape[0] // c.kbuf.shape[1]
    k = c.kbuf[:rows, :, :L].flatten(0, 1)  # (rows KV, L, D): a view of the position-major storage
    v = c.vbuf[:rows, :, :L].flatten(0, 1)
    s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    p = s.softmax(-1) if s.dtype == torch.float32 else s.float().softmax(-1).to(s.dtype)
    return torch.bmm(p, v)


def _out_and_mlp(x: torch.Tensor, o: torch.Tensor, wo, ln2, w_gu, act, wd, native: bool = False) -> torch.Tensor:
    """The rest of a decoder layer on ``(n, C)`` rows: ``x + o_proj(o)``, then ``+ mlp(norm(.))``, both residual
    adds inside the products (``addmm``); the norm and the gated activation in one kernel each when
    ``native`` (``engine.model.cpu_kernels``), else the activation in place on the gate's half."""
    x = torch.addmm(x if wo[1] is None else x + wo[1], o, wo[0])
    gu = _product(_decode_norm(x, *ln2, native), *w_gu)
    h = cpu_kernels.silu_mul(gu) if native and act is F.silu else None
    if h is None:
        g, u = gu.chunk(2, -1)
        h = (F.silu(g, inplace=True) if act is F.silu else act(g)).mul_(u)
    return torch.addmm(x if wd[1] is None else x + wd[1], h, wd[0])


def _product(h: torch.Tensor, w_t: torch.Tensor, b) -> torch.Tensor:
    """``linear(h, w, b)`` from the transposed weight ``w_t`` (the same ``mm``/``addmm`` kernel ``F.linear`` runs)."""
    return torch.mm(h, w_t) if b is None else torch.addmm(b, h, w_t)
