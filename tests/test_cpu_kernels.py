"""The C decode-attention kernel (engine/model/cpu_kernels.py, engine/model/csrc/cpu_kernels.c): hand-computed values,
a float64 reference over the layouts the kv engine produces, the layout checks that keep it in bounds,
its switches, and the decoder's steps with and without it."""

from __future__ import annotations

import math
import os
import platform
import shutil

import pytest
import torch

from engine.model import cpu_kernels
from engine.model import fast_forward as ff
from engine.model.policy import load_policy
from engine.rollout.base import SamplingParams
from engine.rollout.kv import KVEngine
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason=cpu_kernels.status())


def kv_cache(N: int, KV: int, D: int, capacity: int, rows: int | None = None, dtype=torch.float32):
    """Position-major k/v storage ``(capacity, rows, KV, D)`` (as the kv engine keeps it), random, and its
    ``(rows, KV, capacity, D)`` views."""
    rows = rows or N
    k = torch.randn(capacity, rows, KV, D, dtype=dtype)
    v = torch.randn(capacity, rows, KV, D, dtype=dtype)
    return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)


def reference(q, k, v, bias, scale):
    """softmax(scale q k^T + bias) v in float64, per row and key/value head: q (N KV, m, D), k/v (N, KV, L, D)."""
    N, KV, L, D = k.shape
    m = q.shape[1]
    qd = q.double().view(N, KV, m, D)
    s = torch.einsum("nhjd,nhld->nhjl", qd, k.double()) * scale + bias[:, None, None, :L].double()
    return torch.einsum("nhjl,nhld->nhjd", s.softmax(-1), v.double()).reshape(N * KV, m, D)


@needs_kernels
def test_hand_computed_two_positions():
    """Scores 0 and ln 3 give weights 1/4 and 3/4: values 2 and 6 average to 5. With the first position
    masked (-inf) the second gets all the weight: 6. D = 8, one row, one head."""
    D = 8
    k, v = kv_cache(2, 1, D, 4)
    k[:, :, :2] = 0.0
    k[0, 0, 1, 0] = math.log(3)  # q = e_0, so q . k_1 = ln 3, q . k_0 = 0
    v[0, 0, 0] = 2.0
    v[0, 0, 1] = 6.0
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    bias = torch.zeros(1, 4)
    out = cpu_kernels.decode_attention(q, k[:1, :, :2], v[:1, :, :2], bias, 1.0)
    torch.testing.assert_close(out, torch.full((1, 1, D), 5.0), atol=2e-6, rtol=0)
    bias[0, 0] = float("-inf")
    out = cpu_kernels.decode_attention(q, k[:1, :, :2], v[:1, :, :2], bias, 1.0)
    assert torch.equal(out, torch.full((1, 1, D), 6.0))  # exp(-inf) is exactly 0: no trace of position 0


@needs_kernels
@pytest.mark.parametrize(
    "N,KV,m,D,L",
    [
        (64, 4, 1, 32, 30),  # the embedded model's decode step
        (5, 3, 1, 32, 17),  # 15 query rows: the 8-row blocks and a 7-row tail
        (3, 2, 4, 64, 9),  # grouped-query attention: 4 query heads per key/value head
        (1, 1, 1, 8, 1),  # one position: all weight on it
        (7, 2, 2, 16, 40),
    ],
)
def test_matches_float64_reference(N, KV, m, D, L):
    torch.manual_seed(N * 1000 + L)
    capacity, rows = L + 5, N + 3  # the cache holds more positions and rows than the step reads
    kbuf, vbuf = kv_cache(N, KV, D, capacity, rows)
    q = torch.randn(N * KV, m, D)
    bias = torch.zeros(N, capacity + 2)
    pads = torch.randint(0, max(1, L // 2), (N,))  # left padding: the first pads[n] positions hidden
    for n, p in enumerate(pads.tolist()):
        bias[n, :p] = float("-inf")
    scale = 1 / math.sqrt(D)
    k, v = kbuf[:N, :, :L], vbuf[:N, :, :L]
    out = cpu_kernels.decode_attention(q, k, v, bias, scale)
    assert out.shape == (N * KV, m, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, bias, scale), atol=2e-6, rtol=2e-6)


@needs_kernels
def test_large_scores_and_underflow():
    """Scores far apart (softmax taken after subtracting the row maximum): weights that underflow float32
    vanish, and the result stays finite and equal to the reference."""
    N, KV, D, L = 4, 2, 16, 12
    kbuf, vbuf = kv_cache(N, KV, D, L)
    q = torch.randn(N * KV, 1, D) * 40  # scores in the hundreds
    bias = torch.zeros(N, L)
    out = cpu_kernels.decode_attention(q, kbuf, vbuf, bias, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q, kbuf, vbuf, bias, 1.0), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_layouts_it_refuses():
    """Anything but the documented layout returns None (the decoder then takes torch's route): the kernel
    never reads memory the tensors do not describe."""
    N, KV, D, L = 4, 2, 16, 6
    kbuf, vbuf = kv_cache(N, KV, D, L + 2)
    k, v = kbuf[:, :, :L], vbuf[:, :, :L]
    q, bias = torch.randn(N * KV, 1, D), torch.zeros(N, L)
    assert cpu_kernels.decode_attention(q, k, v, bias, 1.0) is not None
    row_major = torch.randn(N, KV, L, D)  # (rows, heads, positions, D) contiguous: positions not outermost
    bad = [
        (q.double(), k, v, bias),  # float64
        (q.transpose(0, 1), k, v, bias),  # not contiguous
        (q, row_major, row_major, bias),
        (q, k, torch.randn(L + 2, N + 1, KV, D).permute(1, 2, 0, 3)[:N, :, :L], bias),  # values strided unlike keys
        (q, k.transpose(0, 1), v.transpose(0, 1), bias),
        (q, k, v, torch.zeros(N, L - 1)),  # bias shorter than the positions
        (q, k, v, torch.zeros(L, N).t()),  # bias columns not contiguous
        (q[:-1], k, v, bias),  # query rows do not match N KV
    ]
    for i, args in enumerate(bad):
        assert not cpu_kernels.attention_fits(*args), i
        assert cpu_kernels.decode_attention(*args, 1.0) is None
    odd_k, odd_v = kv_cache(N, KV, 12, L)  # head size not a multiple of 8
    assert cpu_kernels.decode_attention(torch.randn(N * KV, 1, 12), odd_k, odd_v, bias, 1.0) is None


@needs_kernels
def test_rmsnorm_hand_computed_and_reference():
    """x = (3, 4, 0, ..., 0) over C = 8: mean(x^2) = 25/8, so with eps = 0 and w = 2 the first two outputs
    are 2 x (3, 4) / sqrt(3.125) = (3.394113, 4.525483). Then random rows against the float64 formula,
    and a row of zeros (eps keeps it finite: 0)."""
    x = torch.zeros(1, 8)
    x[0, :2] = torch.tensor([3.0, 4.0])
    out = cpu_kernels.rmsnorm(x, torch.full((8,), 2.0), 0.0)
    torch.testing.assert_close(out[0, :2], torch.tensor([3.394113, 4.525483]), atol=1e-6, rtol=0)
    assert torch.equal(out[0, 2:], torch.zeros(6))
    x = torch.randn(37, 128) * 3
    x[5] = 0.0
    w = torch.randn(128)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(cpu_kernels.rmsnorm(x, w, 1e-5).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(cpu_kernels.rmsnorm(x, w, 1e-5)[5], torch.zeros(128))


@needs_kernels
def test_silu_mul_hand_computed_and_reference():
    """silu(g) = g / (1 + e^-g): g = ln 3 gives 0.75 ln 3, g = -ln 3 gives -ln 3 / 4, g = 0 gives 0; u = 2
    doubles them. Large |g| neither overflows nor loses the sign: silu(80) = 80, silu(-80) ~ -1.4e-33."""
    ln3 = math.log(3)
    g = torch.tensor([ln3, -ln3, 0.0, 80.0, -80.0, 1.0, -1.0, 5.0])
    gu = torch.cat([g, torch.full((8,), 2.0)]).view(1, 16)
    out = cpu_kernels.silu_mul(gu)[0]
    expect = torch.tensor(
        [
            1.5 * ln3,
            -ln3 / 2,
            0.0,
            160.0,
            -160 * math.exp(-80),
            2 / (1 + math.exp(-1)),
            -2 / (1 + math.e),
            10 / (1 + math.exp(-5)),
        ]
    )
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=2e-7)
    assert out[4] < 0
    gu = torch.randn(29, 2 * 384) * 4
    gd = gu.double()
    ref = torch.nn.functional.silu(gd[:, :384]) * gd[:, 384:]
    torch.testing.assert_close(cpu_kernels.silu_mul(gu).double(), ref, atol=1e-5, rtol=1e-6)


@needs_kernels
def test_row_kernels_refuse_what_does_not_fit():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert cpu_kernels.rmsnorm(x.double(), w.double(), 1e-5) is None
    assert cpu_kernels.rmsnorm(torch.randn(16, 4).t(), torch.randn(4), 1e-5) is None  # not contiguous
    assert cpu_kernels.rmsnorm(torch.randn(4, 12), torch.randn(12), 1e-5) is None  # 12 is not a multiple of 8
    assert cpu_kernels.rmsnorm(x, torch.randn(8), 1e-5) is None  # weight of another width
    assert cpu_kernels.silu_mul(torch.randn(4, 24)) is None  # halves of 12
    assert cpu_kernels.silu_mul(torch.randn(32, 4).t()) is None
    assert cpu_kernels.silu_mul(torch.randn(4, 32, dtype=torch.bfloat16)) is None


@needs_kernels
def test_rope_append_by_hand_and_against_torch():
    """A quarter turn (cos 0, sin 1) takes the pair (x0, x1) to (-x1, x0); a zero turn leaves it. Then random
    rows: the queries equal torch's complex product, the keys land rotated at position n of the cache and
    the values as they are, and nothing else in the cache changes."""
    N, H, KV, D, cap = 3, 4, 2, 8, 6
    kbuf, vbuf = kv_cache(N + 1, KV, D, cap)
    k_before, v_before = kbuf.clone(), vbuf.clone()
    qkv = torch.randn(N, H + 2 * KV, D)
    angle = torch.rand(N, 1, D // 2) * 6.28
    angle[0] = math.pi / 2
    angle[1] = 0.0
    rot = torch.polar(torch.ones_like(angle), angle)
    q = cpu_kernels.rope_append(qkv, rot, kbuf, vbuf, 3)
    assert q.shape == (N * KV, H // KV, D)
    x = qkv[0, 0]
    torch.testing.assert_close(q.view(N, H, D)[0, 0, :2], torch.stack([-x[1], x[0]]), atol=1e-6, rtol=0)
    assert torch.equal(q.view(N, H, D)[1], qkv[1, :H])
    turned = torch.view_as_real(torch.view_as_complex(qkv[:, : H + KV].unflatten(-1, (-1, 2))) * rot).flatten(-2)
    torch.testing.assert_close(q.view(N, H, D), turned[:, :H], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kbuf[:N, :, 3], turned[:, H:], atol=1e-6, rtol=1e-6)
    assert torch.equal(vbuf[:N, :, 3], qkv[:, H + KV :])
    written = torch.zeros_like(kbuf, dtype=torch.bool)
    written[:N, :, 3] = True
    assert torch.equal(kbuf[~written], k_before[~written]) and torch.equal(vbuf[~written], v_before[~written])
    assert cpu_kernels.rope_append(qkv, rot, kbuf, vbuf, cap) is None  # past the cache's capacity
    assert cpu_kernels.rope_append(qkv, rot.to(torch.complex128), kbuf, vbuf, 0) is None
    assert cpu_kernels.rope_append(qkv.double(), rot, kbuf, vbuf, 0) is None
    assert cpu_kernels.rope_append(torch.randn(N + 2, H + 2 * KV, D), rot, kbuf, vbuf, 0) is None  # rows


def _fresh(monkeypatch, tmp_path, **env):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("A3PO_CACHE_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_switched_off_by_environment(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path, A3PO_NATIVE_KERNELS="0")
    assert cpu_kernels.library() is None
    assert cpu_kernels.status() == "native CPU kernels: off (turned off by A3PO_NATIVE_KERNELS=0)"
    assert cpu_kernels.decode_attention(torch.zeros(1, 1, 8), *kv_cache(1, 1, 8, 2), torch.zeros(1, 2), 1.0) is None


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_missing_or_failing_compiler_is_one_clear_reason(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path, CC="no-such-compiler-a3po")
    assert cpu_kernels.library() is None
    assert "no C compiler found" in cpu_kernels.status()
    _fresh(monkeypatch, tmp_path, CC="false")  # a "compiler" that fails
    assert cpu_kernels.library() is None
    assert "could not build or load the kernels: false failed" in cpu_kernels.status()
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which(os.environ.get("CC", "cc")) is None,
    reason="needs x86-64 and a C compiler",
)
def test_builds_where_it_should(monkeypatch, tmp_path):
    """On an x86-64 machine with a compiler and AVX2/FMA the kernels build (so the tests above ran, not
    skipped); the library is built once into the cache folder and a second process state just loads it."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if not (" avx2" in flags and " fma" in flags):
        pytest.skip("this CPU lacks AVX2/FMA")
    _fresh(monkeypatch, tmp_path)
    assert cpu_kernels.library() is not None, cpu_kernels.status()
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.library() is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("cpu_kernels-*.so")] == [stamp]


@pytest.fixture(scope="module")
def shipped():
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    return model, tok


@needs_kernels
def test_decoder_steps_with_and_without_the_kernel(shipped, monkeypatch):
    """The shipped model, sampled with retirement: the kv engine with the kernel draws the same tokens as
    with torch's attention, its logits at every step agree to float32 rounding, and the kernels ran on every
    layer of every step (attention and rotary: the steps; norms and activation: the prefill too)."""
    model, tok = shipped
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
    calls = {"decode_attention": [], "rope_append": [], "rmsnorm": [], "silu_mul": []}

    def counting(real, record):
        def counted(*args):
            out = real(*args)
            record.append(out is not None)
            return out

        return counted

    for name, record in calls.items():
        monkeypatch.setattr(cpu_kernels, name, counting(getattr(cpu_kernels, name), record))
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=40, seed=0)
    runs = {}
    for native in (True, False):
        eng = KVEngine(model, tok, native=native)
        eng.trace = []
        runs[native] = (eng.generate(prompts, params), eng.trace)
    (a, trace_a), (b, trace_b) = runs[True], runs[False]
    steps = len(trace_a) - 1  # the first logits come from the prefill
    layers = model.config.num_hidden_layers
    assert all(all(c) for c in calls.values())  # every call fitted the kernels
    assert len(calls["decode_attention"]) == len(calls["rope_append"]) == steps * layers
    # two norms and one activation per layer per step, prefill included, plus the final norm
    assert len(calls["rmsnorm"]) == (steps + 1) * (2 * layers + 1)
    assert len(calls["silu_mul"]) == (steps + 1) * layers
    lengths = a.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows retired along the way
    assert torch.equal(a.response_ids, b.response_ids)
    for (rows_a, la), (rows_b, lb) in zip(trace_a, trace_b):
        assert torch.equal(rows_a, rows_b)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=1e-4)


def test_config_switch_reaches_the_engine(shipped):
    """``rollout.native_kernels=false`` gives an engine that never calls the kernel."""
    from engine.config import load_config
    from engine.resources import demo_config
    from engine.rollout.registry import make_backend

    model, tok = shipped
    for flag in (True, False):
        cfg = load_config(demo_config(), ["rollout.backend=kv", f"rollout.native_kernels={str(flag).lower()}"])
        eng = make_backend("kv", model, tok, cfg)
        assert eng.native == (flag and cpu_kernels.library() is not None)
    assert ff.Decoder.__init__.__defaults__ == (False,)  # a bare Decoder keeps torch's route
