"""engine/fast_forward.py against the models' own forward.

Tiny random models of each supported family (transformers' real classes, 2 layers, vocabulary 60)
with their norm weights and biases randomised too (they initialise to 1 and 0, which would hide a
missing norm or bias), plus the shipped model:

* ``response_logits`` equals ``model(...)`` on every valid response position (fp32: 1e-5) and is
  exactly 0 elsewhere, for batches with shared prompts, distinct prompts, one prompt and one row;
  each unique prompt is embedded once; the gradients of a log-prob sum equal the reference's, so the
  ``G`` rows of a group really sum their gradients into the one prompt computation;
* bf16 goes through ``scaled_dot_product_attention`` and still agrees within bf16 rounding;
* ``unsupported_reason`` accepts the four families and refuses GPT-2, gradient checkpointing and
  active sliding windows (as transformers 5 configs express them);
* the kv engine's ``Decoder`` generates what the model's forward and ``model.generate`` do;
* ``retire_order`` on a hand-worked example; the trainer switch ``model.fast_forward``.
"""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine import fast_forward
from engine.config import load_config
from engine.evaluate import encode_prompts
from engine.kv_engine import KVEngine
from engine.policy import load_policy
from engine.rollout import HFBackend, Rollouts, SamplingParams, left_pad
from engine.store import Store
from engine.tasks import load_problems
from engine.trainer import Trainer, response_logits

PAD, BOS, EOS = 0, 1, 2
COMMON = dict(vocab_size=60, num_hidden_layers=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)

# family name -> (config class, model class, config kwargs). Between them: biases on attention and MLP
# (llama-bias), a scaled rotary embedding, grouped-query attention (mistral, qwen3), one key/value head
# (qwen2, which has q/k/v biases of its own), per-head q/k norms and head_dim * heads != hidden (qwen3).
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=48, intermediate_size=96, num_attention_heads=4)),
    "llama-bias": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(family: str, seed: int = 0, **overrides):
    """A random 2-layer model of ``family`` in eval mode, with random norm weights and biases."""
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **{"initializer_range": 0.1, **kw, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


# Four prompts of different lengths (left padding) and the batches built from them.
A, B, C, D = [5, 9, 13, 7, 22], [31, 4], [8, 8, 40, 3, 17, 29, 11], [12, 50, 6]
LAYOUTS = {
    # rows' prompts and response lengths: groups of 3 (G=3) next to single rows; lengths 1 and the full width
    "mixed": ([A, A, A, B, B, B, C, D], [1, 6, 3, 6, 2, 5, 6, 4]),
    "one-prompt": ([A, A, A, A], [6, 1, 3, 6]),
    "distinct": ([A, B, C, D], [2, 6, 1, 4]),
    "single": ([C], [5]),
}


def batch(layout: str, seed: int = 0) -> Rollouts:
    """The ``Rollouts`` of ``layout``: random response tokens (never EOS), right-padded with PAD."""
    prompts, lengths = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(prompts, PAD)
    T = max(lengths)
    resp = torch.randint(3, 60, (len(prompts), T), generator=g)
    rmask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    resp = resp.masked_fill(rmask == 0, PAD)
    return Rollouts(ids, mask, resp, rmask, torch.zeros(len(prompts), dtype=torch.bool))


def fast(model, ro: Rollouts) -> torch.Tensor:
    return fast_forward.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)


def reference(model, ro: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    return response_logits(model, ro, temperature, fast=False)


def logprob_sum(logits: torch.Tensor, ro: Rollouts) -> torch.Tensor:
    """Sum over valid positions of the log-prob of each response token (what the policy loss sees)."""
    lp = logits.float().log_softmax(-1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    return (lp * ro.response_mask).sum()


# ------------------------------------------------------------------ the configs test what they claim
def test_families_have_the_parts_they_are_meant_to_exercise():
    """The comparisons below only prove something about biases, q/k norms, GQA and rope scaling if the
    tiny models really have them (a renamed config key would silently drop one)."""
    attn = {f: tiny(f).model.layers[0].self_attn for f in FAMILIES}
    assert attn["llama"].q_proj.bias is None
    assert attn["llama-bias"].q_proj.bias is not None and attn["llama-bias"].o_proj.bias is not None
    assert tiny("llama-bias").model.layers[0].mlp.gate_proj.bias is not None
    assert attn["qwen2"].q_proj.bias is not None and attn["qwen2"].k_proj.weight.shape[0] == attn["qwen2"].head_dim
    assert hasattr(attn["qwen3"], "q_norm") and attn["qwen3"].q_proj.weight.shape == (4 * 24, 64)
    assert attn["mistral"].k_proj.weight.shape[0] == 2 * attn["mistral"].head_dim  # 2 kv heads for 4 query heads
    assert tiny("llama-bias").model.rotary_emb.attention_scaling == 1.0  # linear: positions / 2, no rescale
    assert tiny("llama-bias").config.rope_parameters["rope_type"] == "linear"
    norm = tiny("qwen3").model.layers[1].post_attention_layernorm.weight
    assert (norm - 1).abs().max() > 0.1  # norm weights were randomised


# ------------------------------------------------------------------ logits
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_model_forward(family, layout):
    """fp32 logits equal the model's own forward on every valid response position, and are exactly 0
    on the masked ones (left-padded prompts of 2..7 tokens, responses of 1 token up to the full width)."""
    model, ro = tiny(family), batch(layout)
    with torch.no_grad():
        got, want = fast(model, ro), reference(model, ro)
    assert got.shape == want.shape == (*ro.response_ids.shape, 60)
    valid = ro.response_mask.bool()
    assert want[valid].std() > 0.3  # logits far from uniform: the comparison has something to compare
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))


def test_columns_of_padding_only_change_nothing():
    """Rows cut from a wider batch keep columns that are padding in every row (2 more on the left of the
    prompts, 3 more on the right of the responses): the logits are the same, plus 3 zero columns."""
    model, ro = tiny("qwen3"), batch("distinct")
    wide = Rollouts(
        torch.nn.functional.pad(ro.prompt_ids, (2, 0), value=PAD),
        torch.nn.functional.pad(ro.prompt_mask, (2, 0)),
        torch.nn.functional.pad(ro.response_ids, (0, 3), value=PAD),
        torch.nn.functional.pad(ro.response_mask, (0, 3)),
        ro.truncated,
    )
    with torch.no_grad():
        got, narrow = fast(model, wide), fast(model, ro)
        want = reference(model, wide)
    assert got.shape == (4, 9, 60)
    torch.testing.assert_close(got[:, :6], narrow, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 6:], torch.zeros_like(got[:, 6:]))
    valid = wide.response_mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_masked_positions_are_zero_and_counted():
    """The mixed batch has 8 * 6 - 33 = 15 masked response positions: exactly those, and no valid one,
    have an all-zero logit vector."""
    model, ro = tiny("llama"), batch("mixed")
    with torch.no_grad():
        got = fast(model, ro)
    assert int(ro.response_mask.sum()) == 33
    all_zero = (got == 0).all(-1)  # (B, T): True where the whole logit vector is 0
    assert torch.equal(all_zero, ro.response_mask == 0)


def test_each_unique_prompt_is_embedded_once():
    """The packed forward embeds the 4 unique prompts once (5 + 2 + 7 + 3 = 17 tokens, not the 8 rows'
    5*3 + 2*3 + 7 + 3 = 31) plus the 33 real response tokens: 50 tokens, no padding."""
    model, ro = tiny("llama"), batch("mixed")
    seen = []
    h = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            fast(model, ro)
    finally:
        h.remove()
    assert seen == [17 + 33]


def test_padding_contents_are_ignored():
    """Garbage ids under the masks (prompt left padding, response tail) change nothing, and rows whose
    padding differs still share their prompt computation (the prompt key masks the padding)."""
    model, ro = tiny("qwen2"), batch("mixed")
    g = torch.Generator().manual_seed(1)
    noisy = Rollouts(
        torch.where(ro.prompt_mask.bool(), ro.prompt_ids, torch.randint(3, 60, ro.prompt_ids.shape, generator=g)),
        ro.prompt_mask,
        torch.where(ro.response_mask.bool(), ro.response_ids, torch.randint(3, 60, ro.response_ids.shape, generator=g)),
        ro.response_mask,
        ro.truncated,
    )
    assert not torch.equal(noisy.prompt_ids, ro.prompt_ids)
    seen = []
    h = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            a, b = fast(model, ro), fast(model, noisy)
    finally:
        h.remove()
    assert seen == [50, 50]
    assert torch.equal(a, b)


def test_temperature_through_trainer_entry_point():
    """``trainer.response_logits(..., 0.7, fast=True)`` is the reference logits / 0.7 (0 stays 0)."""
    model, ro = tiny("mistral"), batch("mixed")
    valid = ro.response_mask.bool()
    with torch.no_grad():
        got = response_logits(model, ro, 0.7, fast=True)
        want = reference(model, ro, 1.0) / 0.7
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-5)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    torch.testing.assert_close(got, response_logits(model, ro, 1.0, fast=True) / 0.7, atol=0, rtol=1e-6)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_equal_model_forward(family):
    """d(sum of response log-probs)/d(every parameter) equals the reference's on the mixed batch. The
    prompt of a group is computed once and gathered into its 3 rows: a gradient from only one of them
    (or a detached gather) would leave the embedding and layer gradients short by the others' parts.
    Training mode, as in the trainer's update."""
    model, ro = tiny(family).train(), batch("mixed")
    grads = []
    for fn in (fast, reference):
        model.zero_grad(set_to_none=True)
        logprob_sum(fn(model, ro), ro).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    got, want = grads
    assert set(got) == set(want) == {n for n, _ in model.named_parameters()}
    for name, g in want.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[name], g, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_shared_prompt_gradient_is_the_sum_of_its_rows():
    """Four rows on one prompt give the embedding table the sum of the four single-row gradients (each
    row computed on its own, its prompt with it): the one shared prompt computation collects all four."""
    model, ro = tiny("qwen3"), batch("one-prompt")
    emb = model.model.embed_tokens.weight

    def grad(r):
        model.zero_grad(set_to_none=True)
        logprob_sum(fast(model, r), r).backward()
        return emb.grad.clone()

    together = grad(ro)
    apart = sum(grad(ro.rows(torch.tensor([i]))) for i in range(4))
    scale = float(together[A].abs().max())
    assert scale > 0
    torch.testing.assert_close(together, apart, atol=1e-5 * scale, rtol=1e-4)


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("family", ["llama-bias", "mistral", "qwen3"])
def test_bf16_uses_fused_attention_and_agrees(family, monkeypatch):
    """bf16 on CPU takes the ``scaled_dot_product_attention`` branch (2 calls per layer: prompt block and
    response block) and agrees with the model's own bf16 forward within bf16 rounding; fp32 never calls it."""
    model, ro = tiny(family).to(torch.bfloat16), batch("mixed")
    real, calls = fast_forward.F.scaled_dot_product_attention, []

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(fast_forward.F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        got = fast(model, ro)
        n_fast = len(calls)
        want = reference(model, ro)
    assert got.dtype == torch.bfloat16 and n_fast == 4
    valid = ro.response_mask.bool()
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=5e-2, rtol=5e-2)
    calls.clear()
    with torch.no_grad():
        fast(model.float(), ro)
    assert calls == []


# ------------------------------------------------------------------ who may use it
@pytest.mark.parametrize("family", list(FAMILIES))
def test_supported_families(family):
    """The four Llama-layout families (full attention) are supported."""
    assert fast_forward.unsupported_reason(tiny(family)) is None


def test_gpt2_is_refused():
    """Another architecture gets a reason naming its model_type."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    reason = fast_forward.unsupported_reason(model)
    assert reason is not None and "gpt2" in reason


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_:FutureWarning")
@pytest.mark.parametrize("switch", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_is_refused(switch):
    """With checkpointing on (either of transformers 5's names for it), the model's own forward, which
    checkpoints, must be used; switched off again, the model is supported again."""
    model = tiny("llama")
    if not hasattr(model, f"{switch}_enable"):
        pytest.skip(f"this transformers has no {switch}_enable")
    getattr(model, f"{switch}_enable")()
    assert fast_forward.unsupported_reason(model) == "gradient checkpointing is on"
    getattr(model, f"{switch}_disable")()
    assert fast_forward.unsupported_reason(model) is None


def test_attention_dropout_is_refused():
    """A config with attention dropout drops attention weights in training mode, which our forward does not
    do (the logits differ by far more than rounding), so such a model must use its own forward."""
    model, ro = tiny("llama", attention_dropout=0.5).train(), batch("mixed")
    valid = ro.response_mask.bool()
    with torch.no_grad():
        assert (fast(model, ro)[valid] - reference(model, ro)[valid]).abs().max() > 0.1
    assert fast_forward.unsupported_reason(model) == "attention dropout is on"
    assert fast_forward.unsupported_reason(tiny("llama", attention_dropout=0.0)) is None


@pytest.mark.parametrize(
    "family, overrides, refused",
    [
        # Mistral has no layer_types: a window is active whenever sliding_window is set (its default is 4096)
        ("mistral", dict(sliding_window=4096), True),
        ("mistral", dict(sliding_window=None), False),
        # Qwen2/Qwen3: sliding_window only counts with use_sliding_window, and only on layers >= max_window_layers
        ("qwen2", dict(use_sliding_window=False, sliding_window=16), False),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), True),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2), False),
        ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0), True),
    ],
)
def test_sliding_window_configs(family, overrides, refused):
    """Refused exactly when some layer really attends through a sliding window (``layer_types`` where the
    config has them); a window configured but switched off, or past the last layer, is full attention."""
    model = tiny(family, **overrides)
    reason = fast_forward.unsupported_reason(model)
    assert (reason is not None) == refused, reason
    if refused:
        assert "sliding-window" in reason


def test_qwen2_window_past_last_layer_still_matches():
    """The accepted windowed Qwen2 config (max_window_layers = number of layers) is plain full attention
    in transformers too: the fast logits still equal the model's."""
    model, ro = tiny("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=2), batch("mixed")
    assert model.config.layer_types == ["full_attention", "full_attention"]
    valid = ro.response_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(fast(model, ro)[valid], reference(model, ro)[valid], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ retire_order
def test_retire_order_hand_example():
    """done = [F, T, F, T, F, F]: survivors 0, 2, 4, 5 take the first 4 slots; the holes at 1 and 3 are
    filled from the tail rows 4 and 5, rows 0 and 2 stay where they are."""
    done = torch.tensor([False, True, False, True, False, False])
    order, holes, sources = fast_forward.retire_order(done)
    assert order.tolist() == [0, 4, 2, 5]
    assert holes.tolist() == [1, 3]
    assert sources.tolist() == [4, 5]


@pytest.mark.parametrize(
    "done, order, holes, sources",
    [
        ([False, False, False], [0, 1, 2], [], []),  # nothing finished: nothing moves
        ([True, True, False], [2], [0], [2]),  # the last row moves to the front
        ([False, False, True], [0, 1], [], []),  # the tail finished: just shrink
        ([True, False, False, True], [2, 1], [0], [2]),
    ],
)
def test_retire_order_edges(done, order, holes, sources):
    """More hand-worked plans, including the ones that copy nothing."""
    o, h, s = fast_forward.retire_order(torch.tensor(done))
    assert (o.tolist(), h.tolist(), s.tolist()) == (order, holes, sources)


# ------------------------------------------------------------------ the kv engine's decoder
@pytest.fixture(scope="module")
def shipped():
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    return model, tok


def greedy(**kw):
    return SamplingParams(**{"n": 2, "temperature": 0.0, "max_new_tokens": 12, "seed": 0, **kw})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_greedy_equals_model_forward_and_generate(family, shipped):
    """Greedy rollouts with the fast decoder equal the model's forward in the same engine and
    ``model.generate`` token for token (prompts of 2..7 tokens, n=2, 12 new tokens), and each decode
    step's logits agree within 1e-5. EOS is made likely enough that rows retire at different steps, so
    the decoder also runs on a compacted cache."""
    model, tok = tiny(family), shipped[1]
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4.0
    prompts = [A, B, C, D]
    quick, plain = KVEngine(model, tok, fast=True), KVEngine(model, tok, fast=False)
    quick.trace, plain.trace = [], []
    a, b = quick.generate(prompts, greedy()), plain.generate(prompts, greedy())
    c = HFBackend(model, tok).generate(prompts, greedy())
    for other in (b, c):
        assert torch.equal(a.response_ids, other.response_ids)
        assert torch.equal(a.response_mask, other.response_mask)
    lengths = a.response_mask.sum(1)
    assert lengths.min() < lengths.max()
    # beyond the argmax: every step's logits, row for row (the first step is the shared prefill)
    assert len(quick.trace) == len(plain.trace) == a.response_ids.shape[1]
    for (rows_q, logits_q), (rows_p, logits_p) in zip(quick.trace, plain.trace):
        assert torch.equal(rows_q, rows_p)
        torch.testing.assert_close(logits_q, logits_p, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def countdown_prompts(shipped):
    ps = encode_prompts(shipped[1], load_problems("builtin:countdown", "train")[:6])
    assert len({len(p) for p in ps}) >= 2
    return ps


def test_decoder_sampling_matches_model_forward(shipped, countdown_prompts):
    """Sampling (temperature 1, seed 3, n=4) on the shipped model draws the same tokens with the fast
    decoder as with the model's forward: the engine's RNG stream is the same and only float rounding of
    the logits differs, so the recorded log-probs and entropies agree within 1e-4."""
    model, tok = shipped
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=3)
    a = KVEngine(model, tok, fast=True).generate(countdown_prompts, params)
    b = KVEngine(model, tok, fast=False).generate(countdown_prompts, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    lengths = a.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows retired at different steps
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=0)


def test_shipped_model_logits_and_grads(shipped, countdown_prompts):
    """On the shipped model and a real sampled batch (4 samples per prompt): fast logits equal the
    model's within 1e-5 and the log-prob gradient of every parameter agrees."""
    model, tok = shipped
    ro = KVEngine(model, tok).generate(countdown_prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=48))
    lengths = ro.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # responses of different lengths: right padding in the batch
    valid = ro.response_mask.bool()
    outs = []
    for fn in (fast, reference):
        model.zero_grad(set_to_none=True)
        logits = fn(model, ro)
        logprob_sum(logits, ro).backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
    (got, g_got), (want, g_want) = outs
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    for name, g in g_want.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(g_got[name], g, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------ the trainer's switch
TRAIN = [
    "train.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=16",
    "rollout.backend=kv",
    "train.threads=1",
    "train.eval_every=0",
    "train.save_final_model=false",
]


def test_trainer_fast_forward_switch(tmp_path):
    """``model.fast_forward`` picks the path (``tr.fast``) and, on the shipped model, step 1 gives the same
    loss and metrics either way (same rollouts: the kv engine's fast decoder samples the same tokens)."""
    metrics = {}
    for flag in ("false", "true"):
        tr = Trainer(
            load_config(None, [*TRAIN, f"model.fast_forward={flag}"]), Store(tmp_path / flag), log=lambda s: None
        )
        assert tr.fast is (flag == "true")
        assert tr.backend.fast is (flag == "true")
        metrics[flag] = tr.step(1).metrics
    slow, quick = metrics["false"], metrics["true"]
    for key in ("reward", "length", "entropy", "loss", "grad_norm"):
        assert key in slow, key
        assert quick[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-5), key


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_:FutureWarning")
def test_trainer_gradient_checkpointing_falls_back(tmp_path):
    """Gradient checkpointing on: the trainer uses the model's forward even with ``model.fast_forward=true``."""
    cfg = load_config(None, [*TRAIN, "model.fast_forward=true", "model.gradient_checkpointing=true"])
    tr = Trainer(cfg, Store(tmp_path), log=lambda s: None)
    assert tr.fast is False
