"""engine/model/fast_forward.py against the models' own forward.

Tiny random models of the four supported families are built with transformers' real classes (GQA in
three of them, Qwen2's q/k/v bias, Llama with its optional biases, Qwen3's q_norm/k_norm) and every
weight, norms and biases included, is redrawn so that a skipped norm or bias changes the numbers. On a
hand-made batch (prompts of different lengths, groups of three rows sharing a prompt, single-row
prompts, responses of length 1 up to the full width) the packed forward must give the reference logits
and gradients to float rounding, also with padding-only columns or garbage ids under the masks, with
scaled rotary embeddings, and in bf16 (the fused-attention branch, to bf16 rounding).
``unsupported_reason`` refuses other architectures, checkpointing, sliding windows and attention
dropout. The kv engine's one-token ``Decoder`` must give the same logits and greedy tokens as the
model's own forward and ``HFBackend``; ``retire_order`` is checked on a hand-computed case; and a
trainer step gives the same metrics with ``model.fast_forward`` on and off.
"""

import math

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

import engine.model.fast_forward as ff
from engine.config import load_config
from engine.model.policy import load_policy
from engine.rollout.base import Rollouts, SamplingParams
from engine.rollout.hf import HFBackend
from engine.rollout.kv import KVEngine, retire_order
from engine.store.store import Store
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts
from engine.train.trainer import Trainer
from engine.train.trainer import response_logits as trainer_logits

V = 60  # the shipped tokenizer's vocabulary: the random models reuse it
PAD, BOS, EOS = 0, 1, 2
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    tie_word_embeddings=False,
)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    # Llama's optional biases on every projection (attention_bias, mlp_bias)
    "llama-bias": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=4)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=8)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(family: str, seed: int = 0, **over):
    """A random fp32 model of ``family`` whose every parameter is redrawn: weights N(0, 0.2), norm
    weights 1 + N(0, 0.3), biases N(0, 0.5) (the default init has unit norms and zero biases, which a
    forward that forgot them would reproduce)."""
    cls, cfg_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**{**COMMON, **extra, **over}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def make_batch(prompts: list[list[int]], lengths: list[int], seed: int = 1) -> Rollouts:
    """Rollouts with ``prompts`` left-padded and random responses of ``lengths`` right-padded (ids 3..V-1)."""
    g = torch.Generator().manual_seed(seed)
    B, Lp, T = len(prompts), max(map(len, prompts)), max(lengths)
    pid, pm = torch.full((B, Lp), PAD), torch.zeros(B, Lp, dtype=torch.long)
    rid, rm = torch.full((B, T), PAD), torch.zeros(B, T, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        pid[b, Lp - len(p) :], pm[b, Lp - len(p) :] = torch.tensor(p), 1
        rid[b, :n], rm[b, :n] = torch.randint(3, V, (n,), generator=g), 1
    return Rollouts(pid, pm, rid, rm, truncated=torch.zeros(B, dtype=torch.bool))


PA, PB, PC, PD = [1, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16, 17, 18], [1, 19]
# two groups of three sharing a prompt, then two single-row prompts; response lengths 1 .. full width 6
MIXED = ([PA, PA, PA, PB, PB, PB, PC, PD], [1, 6, 3, 6, 2, 4, 5, 1])


def valid(x: torch.Tensor, ro: Rollouts) -> torch.Tensor:
    return x[ro.response_mask.bool()]


def masked_logprob_sum(logits: torch.Tensor, ro: Rollouts) -> torch.Tensor:
    lp = logits.log_softmax(-1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    return (lp * ro.response_mask).sum()


# ------------------------------------------------------------------ response_logits: values
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_model_forward(family):
    model = tiny(family)
    assert ff.unsupported_reason(model) is None
    ro = make_batch(*MIXED)
    with torch.no_grad():
        fast = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        ref = trainer_logits(model, ro, 1.0, fast=False)
    assert fast.shape == ref.shape == (8, 6, V)
    assert ref.std() > 0.5  # the random weights make the logits far from uniform
    torch.testing.assert_close(valid(fast, ro), valid(ref, ro), atol=1e-5, rtol=1e-5)
    assert torch.all(fast[~ro.response_mask.bool()] == 0)  # exactly zero where the response is padding


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_attention_path_float64(family, monkeypatch):
    """Off CPU float32 the packed forward attends with ``scaled_dot_product_attention`` and boolean masks
    (the GPU path); float64 on CPU takes that branch too, so it is checked here, values and gradients.
    transformers' RMSNorm normalises in float32 even for float64 inputs, so the gradients carry float32
    rounding (seen: up to 2e-7 of their scale) and get 1e-6 of scale; the logits agree to 1e-10. Qwen3's
    per-head q/k norms are float32 sums too, and the fast path sums each head's dims in its rotary pair
    order (``_pairs``), so there the loss and logits carry float32 rounding (seen: 6e-7) and get 2e-6."""
    model = tiny(family).double()
    ro = make_batch(*MIXED)
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    loss_f, g_fast = grads(model, ro, fast=True)
    assert len(calls) == 2 * 2  # two layers, each one call for the prompts and one for the responses
    loss_r, g_ref = grads(model, ro, fast=False)
    tol = 2e-6 if family == "qwen3" else 1e-10
    assert loss_f == pytest.approx(loss_r, rel=tol)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-6 * max(1.0, float(g.abs().max())), rtol=1e-6, msg=name)
    with torch.no_grad():
        fast = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        ref = trainer_logits(model, ro, 1.0, fast=False)
    torch.testing.assert_close(valid(fast, ro), valid(ref, ro), atol=tol, rtol=tol)
    assert torch.all(fast[~ro.response_mask.bool()] == 0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama-bias"])
def test_family_extras_matter(family):
    """The extras the forward must apply (Qwen2's q/k/v bias, Qwen3's q_norm/k_norm, Llama's MLP bias) really
    change the logits of these random models: resetting one moves the reference by far more than the tolerance
    (and the packed forward follows)."""
    model = tiny(family)
    ro = make_batch(*MIXED)
    with torch.no_grad():
        before = trainer_logits(model, ro, 1.0, fast=False)
        attn = model.model.layers[0].self_attn
        if family == "qwen2":
            attn.q_proj.bias.zero_()
        elif family == "qwen3":
            attn.q_norm.weight.fill_(1.0)
        else:
            model.model.layers[0].mlp.gate_proj.bias.zero_()
        after = trainer_logits(model, ro, 1.0, fast=False)
        fast = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    assert (valid(before, ro) - valid(after, ro)).abs().max() > 1e-2
    torch.testing.assert_close(valid(fast, ro), valid(after, ro), atol=1e-5, rtol=1e-5)


def test_each_prompt_computed_once():
    """The packed forward embeds each unique prompt's real tokens once plus every real response token but
    each row's last (it predicts nothing and only a later token would attend to it): prompts 5 + 3 + 7 + 2
    = 17, responses 1+6+3+6+2+4+5+1 = 28 minus 8 last ones, so 37 tokens (the padded batch has 8 x 13)."""
    model = tiny("llama")
    ro = make_batch(*MIXED)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    finally:
        hook.remove()
    assert seen == [37]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(([PC] * 4, [2, 5, 1, 3]), id="all-share-one-prompt"),
        pytest.param(([PA, PB, PC, PD, [1, 20, 21, 22]], [3, 1, 4, 2, 4]), id="no-two-share"),
        pytest.param(([PB], [4]), id="single-row"),
        pytest.param(([PD, PD], [1, 1]), id="responses-of-one-token"),
    ],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_other_batch_shapes(family, batch):
    model = tiny(family)
    ro = make_batch(*batch)
    with torch.no_grad():
        fast = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        ref = trainer_logits(model, ro, 1.0, fast=False)
    torch.testing.assert_close(valid(fast, ro), valid(ref, ro), atol=1e-5, rtol=1e-5)
    assert torch.all(fast[~ro.response_mask.bool()] == 0)


def test_temperature_through_trainer():
    model = tiny("qwen3")
    ro = make_batch(*MIXED)
    with torch.no_grad():
        raw = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        fast = trainer_logits(model, ro, 0.7, fast=True)
        ref = trainer_logits(model, ro, 0.7, fast=False)
        ref1 = trainer_logits(model, ro, 1.0, fast=False)
    torch.testing.assert_close(fast, raw / 0.7, atol=0, rtol=0)
    torch.testing.assert_close(valid(fast, ro), valid(ref, ro), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(valid(ref, ro), valid(ref1, ro) / 0.7, atol=2e-5, rtol=1e-5)
    assert torch.all(fast[~ro.response_mask.bool()] == 0)


def fast_logits(model, ro: Rollouts) -> torch.Tensor:
    return ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)


def test_columns_of_padding_only_change_nothing():
    """Rows cut from a wider batch keep columns that are padding in every row (2 more on the left of the
    prompts, 3 more on the right of the responses): the same logits, plus 3 zero columns."""
    model, ro = tiny("qwen3"), make_batch(*MIXED)
    pad = torch.nn.functional.pad
    wide = Rollouts(
        pad(ro.prompt_ids, (2, 0), value=PAD),
        pad(ro.prompt_mask, (2, 0)),
        pad(ro.response_ids, (0, 3), value=PAD),
        pad(ro.response_mask, (0, 3)),
        ro.truncated,
    )
    with torch.no_grad():
        got, narrow, ref = fast_logits(model, wide), fast_logits(model, ro), trainer_logits(model, wide, 1.0)
    assert got.shape == (8, 9, V)
    torch.testing.assert_close(got[:, :6], narrow, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, 6:] == 0)
    torch.testing.assert_close(valid(got, wide), valid(ref, wide), atol=1e-5, rtol=1e-5)


def test_padding_contents_are_ignored():
    """Garbage ids under the masks (prompt left padding, response tail) change nothing, and the rows of a
    group whose padding now differs still share one prompt computation (the prompt key masks the padding):
    17 prompt + 20 response tokens embedded, as for the clean batch."""
    model, ro = tiny("qwen2"), make_batch(*MIXED)
    g = torch.Generator().manual_seed(5)

    def noise(x):
        return torch.randint(3, V, x.shape, generator=g)

    noisy = Rollouts(
        torch.where(ro.prompt_mask.bool(), ro.prompt_ids, noise(ro.prompt_ids)),
        ro.prompt_mask,
        torch.where(ro.response_mask.bool(), ro.response_ids, noise(ro.response_ids)),
        ro.response_mask,
        ro.truncated,
    )
    assert not torch.equal(noisy.prompt_ids, ro.prompt_ids) and not torch.equal(noisy.response_ids, ro.response_ids)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            clean, dirty = fast_logits(model, ro), fast_logits(model, noisy)
    finally:
        hook.remove()
    assert seen == [37, 37]
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500000.0,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_scaled_rotary_embeddings(rope):
    """The packed forward takes cos/sin from the model's own rotary module, so scaled rope types agree too
    (llama3 with original length 8: the 13-token rows reach past it)."""
    model, ro = tiny("llama", rope_parameters=rope), make_batch(*MIXED)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    with torch.no_grad():
        got, ref = fast_logits(model, ro), trainer_logits(model, ro, 1.0)
        plain = trainer_logits(tiny("llama"), ro, 1.0)
    assert (valid(ref, ro) - valid(plain, ro)).abs().max() > 1e-2  # the scaling really changes the model
    torch.testing.assert_close(valid(got, ro), valid(ref, ro), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama-bias", "mistral", "qwen3"])
def test_bf16_fused_attention(family, monkeypatch):
    """bf16 on CPU takes the ``scaled_dot_product_attention`` branch (2 calls per layer: prompt block and
    response block) and agrees with the model's own bf16 forward within bf16 rounding (5e-2 of the logits'
    scale); fp32 on CPU never calls it."""
    model, ro = tiny(family).to(torch.bfloat16), make_batch(*MIXED)
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kw):
        calls.append(args[0].dtype)
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        got = fast_logits(model, ro)
        assert calls == [torch.bfloat16] * 4
        ref = trainer_logits(model, ro, 1.0)
        calls.clear()
        fast_logits(model.float(), ro)
    assert calls == []
    assert got.dtype == torch.bfloat16
    scale = float(valid(ref, ro).float().abs().max())
    torch.testing.assert_close(valid(got, ro).float(), valid(ref, ro).float(), atol=5e-2 * scale, rtol=5e-2)
    assert torch.all(got[~ro.response_mask.bool()] == 0)


# ------------------------------------------------------------------ response_logits: gradients
def grads(model, ro: Rollouts, fast: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = masked_logprob_sum(trainer_logits(model, ro, 1.0, fast=fast), ro)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_model_forward(family):
    """On the shared-prompt batch the prompt tokens run once for three rows: their gradient must be the
    sum of the three rows' (the reference runs the prompt three times)."""
    model = tiny(family)
    ro = make_batch(*MIXED)
    loss_f, g_fast = grads(model, ro, fast=True)
    loss_r, g_ref = grads(model, ro, fast=False)
    assert loss_f == pytest.approx(loss_r, rel=1e-6)
    assert g_fast.keys() == g_ref.keys()
    for name, g in g_ref.items():
        scale = float(g.abs().max())
        assert scale > 0, name  # every parameter takes part (lm_head, norms, biases, embeddings)
        torch.testing.assert_close(g_fast[name], g, atol=1e-5 * max(1.0, scale), rtol=1e-5, msg=name)


def test_prompt_gradient_is_summed_over_the_group():
    """Hand-checkable form of the summing: the gradient on the embedding row of a token that occurs only
    in the shared prompt PA equals the sum of the gradients of the three rows taken one at a time."""
    model = tiny("llama")
    ro = make_batch(*MIXED)
    emb = model.model.embed_tokens.weight
    tok = 8  # occurs in PA only; make_batch's responses may contain it too, so clear it from them
    ro.response_ids[ro.response_ids == tok] = 30
    model.zero_grad(set_to_none=True)
    masked_logprob_sum(trainer_logits(model, ro, 1.0, fast=True), ro).backward()
    together = emb.grad[tok].clone()
    alone = torch.zeros_like(together)
    for b in range(3):
        model.zero_grad(set_to_none=True)
        one = ro.rows(torch.tensor([b]))
        masked_logprob_sum(trainer_logits(model, one, 1.0, fast=True), one).backward()
        alone += emb.grad[tok]
    assert together.abs().max() > 0
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ unsupported_reason
def test_supported_families():
    for family in FAMILIES:
        assert ff.unsupported_reason(tiny(family)) is None, family


def test_gpt2_unsupported():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    assert "gpt2" in ff.unsupported_reason(model)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation checkpointing
def test_gradient_checkpointing_unsupported():
    model = tiny("llama")
    model.gradient_checkpointing_enable()
    assert ff.unsupported_reason(model) == "gradient checkpointing is on"
    model.gradient_checkpointing_disable()
    assert ff.unsupported_reason(model) is None


@pytest.mark.parametrize(
    "family, over",
    [
        # MistralConfig's default sliding_window is 4096 and its modeling always applies it
        # (at 4096 it cannot change these short sequences: only the reason is checked)
        pytest.param("mistral", dict(sliding_window=4096), id="mistral-default-window"),
        # Mistral's modeling reads sliding_window only, never layer_types: a window is still a window
        pytest.param(
            "mistral", dict(sliding_window=4, layer_types=["full_attention"] * 2), id="mistral-window-layer-types"
        ),
        # Qwen2/Qwen3 turn the window on per layer (layer_types) from max_window_layers on
        pytest.param("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), id="qwen2"),
        pytest.param("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), id="qwen3"),
    ],
)
def test_sliding_window_unsupported(family, over):
    model = tiny(family, **over)
    reason = ff.unsupported_reason(model)
    assert reason is not None and "sliding" in reason
    if model.config.sliding_window > 13:
        return
    # a window of 4 over 13-token rows really changes the model's logits: full attention would be wrong
    ro = make_batch(*MIXED)
    with torch.no_grad():
        ref = trainer_logits(model, ro, 1.0, fast=False)
        full = ff.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    assert (valid(ref, ro) - valid(full, ro)).abs().max() > 1e-3


def test_qwen2_window_flag_off_is_supported():
    """Qwen2 drops sliding_window when use_sliding_window is false (its default): full attention."""
    model = tiny("qwen2", use_sliding_window=False, sliding_window=4)
    assert model.config.sliding_window is None
    assert ff.unsupported_reason(model) is None


def test_qwen2_window_past_the_last_layer_is_supported():
    """A Qwen2 window from layer max_window_layers = 2 on, in a 2-layer model, is on no layer: transformers
    makes both layers full attention, so the fast path is allowed and equal to the model."""
    model, ro = tiny("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=2), make_batch(*MIXED)
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert ff.unsupported_reason(model) is None
    with torch.no_grad():
        got, ref = fast_logits(model, ro), trainer_logits(model, ro, 1.0)
    torch.testing.assert_close(valid(got, ro), valid(ref, ro), atol=1e-5, rtol=1e-5)


def test_attention_dropout_unsupported():
    """With attention dropout in the config the model drops attention weights in training mode, which the
    packed forward does not (the logits differ by far more than rounding): such a model is refused."""
    model, ro = tiny("llama", attention_dropout=0.5).train(), make_batch(*MIXED)
    with torch.no_grad():
        assert (valid(fast_logits(model, ro), ro) - valid(trainer_logits(model, ro, 1.0), ro)).abs().max() > 0.1
    assert ff.unsupported_reason(model) == "attention dropout is on"
    assert ff.unsupported_reason(tiny("llama", attention_dropout=0.0)) is None


def test_activation_checkpointing_unsupported():
    """transformers 5's own name for the switch (``activation_checkpointing_enable``) is refused as well."""
    model = tiny("qwen3")
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("this transformers has no activation_checkpointing_enable")
    model.activation_checkpointing_enable()
    assert ff.unsupported_reason(model) == "gradient checkpointing is on"
    model.activation_checkpointing_disable()
    assert ff.unsupported_reason(model) is None


# ------------------------------------------------------------------ retire_order
def test_retire_order_hand_example():
    done = torch.tensor([False, True, False, True, False, False])
    order, holes, sources = retire_order(done)
    # survivors 0, 2, 4, 5 fill the first four slots; holes 1 and 3 take the tail rows 4 and 5
    assert holes.tolist() == [1, 3]
    assert sources.tolist() == [4, 5]
    assert order.tolist() == [0, 4, 2, 5]


@pytest.mark.parametrize(
    "done, order, holes",
    [
        ([False, False, True, True], [0, 1], []),  # only the tail finished: nothing moves
        ([True, False], [1], [0]),
        ([False, False, False], [0, 1, 2], []),
        ([True, True, False, True, False], [2, 4], [0, 1]),
    ],
)
def test_retire_order_cases(done, order, holes):
    o, h, s = retire_order(torch.tensor(done))
    assert o.tolist() == order
    assert h.tolist() == holes
    assert s.tolist() == [i for i in order if i >= len(order)]  # the survivors beyond the prefix move


# ------------------------------------------------------------------ Decoder in the kv engine
@pytest.fixture(scope="module")
def shipped():
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    assert model.config.vocab_size == V and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    return model, tok


@pytest.fixture(scope="module")
def prompts(shipped):
    _, tok = shipped
    ps = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
    assert len({len(p) for p in ps}) >= 2  # left padding is exercised
    return ps


def count_steps(monkeypatch) -> list:
    """Record every ``Decoder.step`` call (to prove the fast path really ran)."""
    calls, real = [], ff.Decoder.step

    def step(self, tok, pos, bias):
        calls.append(tok.shape[0])
        return real(self, tok, pos, bias)

    monkeypatch.setattr(ff.Decoder, "step", step)
    return calls


def traced(model, tok, prompts, params, fast):
    eng = KVEngine(model, tok, fast=fast)
    eng.trace = []
    return eng.generate(prompts, params), eng.trace


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_greedy_equals_model_forward_and_hf(family, shipped, prompts, monkeypatch):
    _, tok = shipped
    model = tiny(family)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10, seed=0)
    calls = count_steps(monkeypatch)
    a, trace_a = traced(model, tok, prompts, params, fast=True)
    assert calls  # the Decoder ran
    n_fast = len(calls)
    b, trace_b = traced(model, tok, prompts, params, fast=False)
    assert len(calls) == n_fast  # and the reference did not use it
    hf = HFBackend(model, tok).generate(prompts, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response_ids, hf.response_ids) and torch.equal(a.response_mask, hf.response_mask)
    assert len(trace_a) == len(trace_b)
    for (rows_a, la), (rows_b, lb) in zip(trace_a, trace_b):
        assert torch.equal(rows_a, rows_b)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decoder_other_dtypes(dtype, shipped, prompts, monkeypatch):
    """float64 takes the same complex-product path as float32 (complex128); bfloat16 cannot be viewed as
    complex, so its keys are rotated in float32 and copied into the cache. Both give the model forward's
    logits at every step: float64 to 1e-5 (transformers computes the RMSNorm and the rotary cos/sin in
    float32 even for a float64 model, so float32's level; the decoder before the lean step gave the
    same differences), bfloat16 to its own rounding."""
    _, tok = shipped
    model = tiny("llama").to(dtype)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, seed=0)
    calls = count_steps(monkeypatch)
    a, trace_a = traced(model, tok, prompts, params, fast=True)
    assert calls
    b, trace_b = traced(model, tok, prompts, params, fast=False)
    tol = 1e-5 if dtype == torch.float64 else 0.1
    assert len(trace_a) == len(trace_b)
    for (rows_a, la), (rows_b, lb) in zip(trace_a[:3], trace_b[:3]):
        assert torch.equal(rows_a, rows_b)
        torch.testing.assert_close(la, lb, atol=tol, rtol=tol)
    if dtype == torch.float64:
        assert torch.equal(a.response_ids, b.response_ids)


def test_decoder_with_retirement(shipped, prompts, monkeypatch):
    """Rows finish at different steps (EOS), so the Decoder keeps stepping a compacted cache: the logits of
    every later step still match the model's forward on the same rows."""
    model, tok = shipped
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=40, seed=0)
    calls = count_steps(monkeypatch)
    a, trace_a = traced(model, tok, prompts, params, fast=True)
    b, trace_b = traced(model, tok, prompts, params, fast=False)
    lengths = a.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # retirement happened
    assert min(calls) < max(calls)  # and the Decoder stepped fewer rows afterwards
    # same RNG stream; the logits differ by float rounding only, so the sampled ids are the same
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    for (rows_a, la), (rows_b, lb) in zip(trace_a, trace_b):
        assert torch.equal(rows_a, rows_b)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=1e-4)


def test_cache_storage_is_position_major(shipped, prompts):
    """Each slot layer's ``(rows, heads, capacity, D)`` buffers are views of ``(capacity, rows, heads, D)``
    storage, before and after the rows are repeated for the samples, and the attention's per-head
    matrices are views of it too (no copy per step)."""
    from engine.rollout.kv import _RowCache

    model, _ = shipped
    rc = _RowCache(model.config, 20)
    assert rc.slot
    dec = ff.Decoder(model, rc.cache.layers, 20)
    ids = torch.tensor([[BOS, 5, 6], [PAD, BOS, 7]])
    mask = (ids != PAD).long()
    dec.prefill(ids, mask, (mask.cumsum(1) - 1).clamp_min(0))
    for grown in (False, True):
        if grown:
            rc.expand(3)
        for layer in rc.cache.layers:
            for buf in (layer.kbuf, layer.vbuf):
                assert buf.shape[0] == (6 if grown else 2) and buf.shape[2] == 20
                assert buf.permute(2, 0, 1, 3).is_contiguous()
                per_head = buf[:4, :, :5].flatten(0, 1)  # what _attend_cache multiplies with
                assert per_head.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def test_shipped_model_update_logits(shipped, prompts):
    """One realistic check of the packed forward: the shipped model on its own sampled rollouts."""
    model, tok = shipped
    ro = KVEngine(model, tok).generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=1))
    with torch.no_grad():
        fast = trainer_logits(model, ro, 1.0, fast=True)
        ref = trainer_logits(model, ro, 1.0, fast=False)
    torch.testing.assert_close(valid(fast, ro), valid(ref, ro), atol=1e-4, rtol=1e-4)
    assert torch.all(fast[~ro.response_mask.bool()] == 0)


def test_shipped_model_update_gradients(shipped, prompts):
    """The shipped model (tied embeddings) on its own sampled rollouts, 4 per prompt, responses of different
    lengths: the log-prob gradient of every parameter agrees with the model's forward."""
    model, tok = shipped
    ro = KVEngine(model, tok).generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=3))
    lengths = ro.response_mask.sum(1)
    assert lengths.min() < lengths.max()
    try:
        loss_f, g_fast = grads(model, ro, fast=True)
        loss_r, g_ref = grads(model, ro, fast=False)
    finally:
        model.zero_grad(set_to_none=True)
    assert loss_f == pytest.approx(loss_r, rel=1e-6)
    for name, g in g_ref.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(g_fast[name], g, atol=1e-5 * scale, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ trainer wiring
def test_trainer_fast_switch_same_step(tmp_path):
    base = [
        "train.prompts_per_step=4",
        "rollout.n=4",
        "rollout.max_new_tokens=48",  # long enough for some correct answers: non-zero advantages
        "actor.mini_batches=2",
        "train.threads=1",
        "train.steps=2",
        "rollout.backend=kv",
    ]
    out = {}
    for fast in (False, True):
        tr = Trainer(
            load_config(None, [*base, f"model.fast_forward={str(fast).lower()}"]),
            Store(tmp_path / str(fast)),
            log=lambda s: None,
        )
        assert tr.fast is fast and tr.backend.fast is fast
        out[fast] = {k: v for k, v in tr.step(1).metrics.items() if not k.startswith("t_")}
        out[fast]["weights"] = [p.detach().clone() for p in tr.model.parameters()]
    slow, fast = out[False], out[True]
    assert slow.keys() == fast.keys()
    assert slow["grad_norm"] > 0 and 0 < slow["reward"] < 1  # a real update happened
    for k, v in slow.items():
        if k == "weights":
            # AdamW (lr 1e-4) divides by sqrt(v): an entry whose gradient is tiny still moves by up to ~lr, so
            # float rounding in that gradient can shift it by a fraction of lr; 3e-5 is well under one step
            for a, b in zip(fast[k], v):
                torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)
        elif isinstance(v, float) and not math.isnan(v):
            assert fast[k] == pytest.approx(v, abs=1e-4, rel=1e-4), k
        else:
            assert fast[k] == v or (isinstance(v, float) and math.isnan(fast[k])), k


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation checkpointing
def test_trainer_gradient_checkpointing_uses_model_forward(tmp_path):
    """``model.gradient_checkpointing=true`` sends the update to the model's own forward even with
    ``model.fast_forward=true`` (``tr.fast`` is False)."""
    cfg = load_config(
        None, ["train.threads=1", "rollout.backend=kv", "model.fast_forward=true", "model.gradient_checkpointing=true"]
    )
    tr = Trainer(cfg, Store(tmp_path), log=lambda s: None)
    assert tr.fast is False
