"""C kernels for the CPU decode step, compiled from ``engine/model/csrc/cpu_kernels.c`` on first use.

Why: at the embedded model's size a decode step is hundreds of small torch kernels, and their dispatch
costs more than their arithmetic. The attention alone is hundreds of tiny matrix products per layer
(one ``1 x D`` query against its row's ``L x D`` keys, per row and head), which torch runs as a batched
product, a softmax and a second batched product whose per-matrix overhead is most of their time; the
rotary embedding and cache write are a dozen view, complex-product and copy kernels, the RMSNorm six
and the gated activation three. Here each is one call: ``decode_attention`` (one pass over the
position-major cache), ``rope_append``, ``rmsnorm`` and ``silu_mul``. On the embedded workloads
generation took 0.69x torch's time with all four (arith and Countdown-lite, ``bench/bench_decode.py``).

How: the source is compiled with the system's C compiler (``$CC``, else ``cc``) into a shared library
under the user's cache folder (``$A3PO_CACHE_DIR``, else ``$XDG_CACHE_HOME/a3po-lab``, else
``~/.cache/a3po-lab``), named by a hash of the source, compiler and flags, so each version is built once
per machine (about half a second) and every later process, rollout workers included, only loads it.
It is written to a temporary name and renamed into place, so processes that build it at the same time
do not see each other's half-written files.

Nothing here is required: without a C compiler, off x86-64, on a CPU without AVX2/FMA, or with
``rollout.native_kernels=false`` (or ``A3PO_NATIVE_KERNELS=0`` in the environment) the decoder keeps
torch's route, and ``status()`` says why. The kernels' results match torch's to float32 rounding
(tests/test_cpu_kernels.py).

    python -c "from engine.model import cpu_kernels; print(cpu_kernels.status())"
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
ENV_SWITCH = "A3PO_NATIVE_KERNELS"

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": why it is None


def cache_dir() -> Path:
    """Where built libraries live (see the module docstring)."""
    if os.environ.get("A3PO_CACHE_DIR"):
        return Path(os.environ["A3PO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "a3po-lab"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc.split()[0]) and cc


def _build(cc: str) -> Path:
    """Compile the source once for this source, compiler and flag set; return the library's path."""
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    target = folder / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        res = subprocess.run([*cc.split(), *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            said = (res.stderr or res.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} failed: {said[-1] if said else f'exit code {res.returncode}'}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are x86-64 (AVX2) code; this machine is {platform.machine()}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install one, e.g. gcc)"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"could not build or load the kernels: {e}"
    if not lib.a3po_cpu_supported():
        return None, "this CPU lacks AVX2/FMA"
    ptr, long, flt = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    for name, args in (
        ("a3po_decode_attention", [ptr] * 6 + [long] * 7 + [flt]),
        ("a3po_rmsnorm", [ptr] * 3 + [long] * 2 + [flt]),
        ("a3po_silu_mul", [ptr] * 2 + [long] * 2),
        ("a3po_rope_append", [ptr] * 5 + [long] * 6),
    ):
        f = getattr(lib, name)
        f.restype, f.argtypes = None, args
    return lib, None


def library():
    """The loaded kernels (built on the first call in a process), or None when they cannot run here."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"] = _load()
    return _state["lib"]


def status() -> str:
    """One line: whether the kernels run here, and why not when they do not."""
    return "native CPU kernels: on" if library() is not None else f"native CPU kernels: off ({_state['why']})"


def _position_major(k: torch.Tensor, v: torch.Tensor) -> bool:
    """``k``/``v`` are ``(rows, KV, positions, D)`` float32 CPU views of position-major storage, alike: each
    position's ``rows KV`` heads one contiguous block (strides ``(KV D, D, >= rows KV D, 1)``)."""
    if k.dim() != 4 or v.dim() != 4:
        return False
    rows, KV, _, D = k.shape
    return (
        k.dtype is torch.float32
        and v.dtype is torch.float32
        and k.device.type == "cpu"
        and v.device.type == "cpu"
        and v.shape == k.shape
        and v.stride() == k.stride()
        and k.stride(3) == 1
        and k.stride(1) == D
        and k.stride(0) == KV * D
        and k.stride(2) >= rows * KV * D
    )


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes these tensors (shapes and strides as it documents them)."""
    if q.dim() != 3 or bias.dim() != 2 or not _position_major(k, v):
        return False
    N, KV, L, D = k.shape
    ok = (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q, bias))
        and D % 8 == 0
        and q.is_contiguous()
        and q.shape[0] == N * KV
        and q.shape[2] == D
        and bias.shape[0] == N
        and bias.shape[1] >= L
        and bias.stride(1) == 1
    )
    return bool(ok)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float):
    """Softmax attention of ``q`` over the cached ``k``/``v``, ``softmax(scale q k^T + bias) v`` per row and
    key/value head (``m`` query heads share one): ``(N KV, m, D)``; None when the kernels are off here or
    the tensors do not fit them (``attention_fits``), and the caller takes its own route.

    q ``(N KV, m, D)`` contiguous float32; k, v ``(N, KV, L, D)`` float32 views with each position's
    ``N KV`` heads one contiguous block (the kv engine's position-major cache: strides
    ``(KV D, D, >= N KV D, 1)``); bias ``(N, >= L)``, 0 or -inf, its first ``L`` columns used, every row
    attending somewhere. The checks come first, so the kernel never reads out of bounds."""
    lib = library()
    if lib is None or not attention_fits(q, k, v, bias):
        return None
    N, KV, L, D = k.shape
    R = q.shape[0] * q.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    work = torch.empty((L + 2) * R, dtype=torch.float32)
    lib.a3po_decode_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        bias.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        N,
        KV,
        q.shape[1],
        D,
        L,
        k.stride(2),
        bias.stride(0),
        float(scale),
    )
    return out


def _fits_rows(x: torch.Tensor, width: int) -> bool:
    """``x`` is a contiguous ``(n, width)`` float32 CPU tensor and ``width`` a whole number of 8-float vectors
    (the cheap checks first: these kernels run on every layer of every decode step)."""
    return (
        x.dtype is torch.float32
        and x.dim() == 2
        and x.shape[1] == width
        and width % 8 == 0
        and x.is_contiguous()
        and x.device.type == "cpu"
    )


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float):
    """transformers' float32 RMSNorm of the rows of ``x`` ``(n, C)``, ``x / sqrt(mean(x^2) + eps) * w``;
    None when the kernels are off or the tensors do not fit (contiguous float32, ``C`` a multiple of 8,
    ``w`` ``(C,)``). No autograd: for decoding."""
    lib = library()
    if lib is None or not (_fits_rows(x, x.shape[-1]) and _fits_rows(w.view(1, -1), x.shape[1])):
        return None
    out = torch.empty_like(x)
    lib.a3po_rmsnorm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def silu_mul(gu: torch.Tensor):
    """``silu(g) * u`` for ``gu`` ``(n, 2 I)`` laid out ``[g | u]`` (the stacked gate/up product): ``(n, I)``;
    None when the kernels are off or ``gu`` does not fit (contiguous float32, ``I`` a multiple of 8)."""
    lib = library()
    if lib is None or not (_fits_rows(gu, gu.shape[-1]) and gu.shape[1] % 16 == 0):
        return None
    n, width = gu.shape
    out = gu.new_empty((n, width // 2))
    lib.a3po_silu_mul(gu.data_ptr(), out.data_ptr(), n, width // 2)
    return out


def rope_append(qkv: torch.Tensor, rot: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int):
    """One decode step's rotary embedding and cache write: the rotary-embedded queries, after writing the
    rotated keys and the values of ``qkv`` at position ``n`` of the cache; None (nothing written) when the
    kernels are off or the tensors do not fit.

    qkv ``(N, H + 2 KV, D)`` contiguous float32 (q and k in ``fast_forward._pairs`` order); rot ``(N, 1, D/2)``
    complex64 contiguous (``cos + i sin`` per pair); k, v the cache's ``(rows, KV, capacity, D)`` views
    (position-major storage, as ``decode_attention`` takes them) with ``N <= rows`` and ``n < capacity``.
    The queries come back as ``(N KV, H / KV, D)``, the layout ``decode_attention`` takes."""
    lib = library()
    if lib is None or qkv.dim() != 3 or not _position_major(k, v):
        return None
    N, heads, D = qkv.shape
    rows, KV, capacity, _ = k.shape
    H = heads - 2 * KV
    ok = (
        qkv.dtype is torch.float32
        and qkv.is_contiguous()
        and qkv.device.type == "cpu"
        and H > 0
        and H % KV == 0
        and D % 2 == 0
        and rot.dtype is torch.complex64
        and rot.is_contiguous()
        and tuple(rot.shape) == (N, 1, D // 2)
        and 0 <= n < capacity
        and N <= rows
        and k.shape[3] == D
    )
    if not ok:
        return None
    q = qkv.new_empty((N * KV, H // KV, D))
    lib.a3po_rope_append(
        qkv.data_ptr(), rot.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), N, H, KV, D, k.stride(2), n
    )
    return q
