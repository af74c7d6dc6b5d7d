"""GPU check that proves something: each leg asserts, and prints timings and peak memory.

1. Chunked vs full log-prob/entropy on a 150k vocabulary in bfloat16. The chunked functions compute
   in float32 and round the result to bf16, so they must match the float32 reference within half a
   bf16 ulp (relative 2^-8 bounds it); a looser absolute tolerance would hide real errors near 0
   and reject correct rounding near -30 (where one bf16 ulp is 0.125).
2. A 20-step A3PO run of the embedded model in bf16 raises the mean reward (last 5 steps above the
   first 5); step time by phase and peak memory are printed.
3. When vLLM imports: the vLLM backend's greedy outputs equal the HF backend's on 8 prompts.
4. ``engine/model/fast_forward.py`` in bf16 on the device: on 64 sampled rollouts its response log-probs are
   no further from the float32 forward of the same weights than the model's own bf16 forward is (mean
   and max |diff|, with a 25% and one-bf16-step margin), and the forward + backward time of both is printed.

``--cpu`` runs the same legs on the CPU (still bf16, smaller sizes) so CI exercises the script.

    bash scripts/gpu_check.sh           # on one GPU, < 10 minutes, no internet needed
    bash scripts/gpu_check.sh --cpu     # the same checks on the CPU (CI)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.model.ops import token_entropy, token_logprobs  # noqa: E402
from engine.store.store import Store  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def chunked_vs_full(device: str, V: int = 151_936, N: int = 4096) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device=device) * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=device)
    _sync(device)
    t0 = time.perf_counter()
    lp_c, ent_c = token_logprobs(logits, labels, chunk_size=512), token_entropy(logits, chunk_size=512)
    _sync(device)
    t_c = time.perf_counter() - t0
    logp = torch.log_softmax(logits.float(), -1)
    lp_f = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent_f = -(logp.exp() * logp).sum(-1)
    for name, got, ref in (("logprob", lp_c, lp_f), ("entropy", ent_c, ent_f)):
        err = (got.float() - ref).abs()
        tol = ref.abs() * 2**-8 + 1e-5  # half a bf16 ulp is at most |x| * 2^-8
        worst = (err - tol).argmax()
        print(
            f"[ops] {name}: max |diff| {err.max().item():.2e} at |ref| {ref.abs()[err.argmax()].item():.1f}; "
            f"worst margin {(tol - err)[worst].item():+.2e}"
        )
        assert bool((err <= tol).all()), f"chunked {name} is off by more than bf16 rounding"
    print(
        f"[ops] vocab {V}, {N} tokens on {device}: chunked {t_c * 1000:.1f} ms "
        f"(a full float32 softmax would be {N * V * 4 / 2**20:.0f} MiB)"
    )


def a3po_run(device: str, steps: int, prompts: int, n: int) -> None:
    cfg = load_config(
        None,
        [
            f"model.device={device}",
            "model.dtype=bfloat16",
            f"train.prompts_per_step={prompts}",
            f"rollout.n={n}",
            f"train.steps={steps}",
            "eval.n_prompts=16",
            "eval.at_start=false",
            "train.eval_every=0",
            "train.save_final_model=false",
            "train.threads=2",
            "actor.lr=3e-4",
        ],
    )
    rewards, phases = [], {}
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Store(d), log=lambda s: None)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for s in range(1, steps + 1):
            m, tables = tr.step(s)
            tr.store.write_step(tr.run_id, s, tables)
            rewards.append(m["reward"])
            for k, v in m.items():
                if k.startswith("t_"):
                    phases.setdefault(k[2:], []).append(v)
            print(f"[a3po] step {s:2d}: reward {m['reward']:.3f} entropy {m['entropy']:.4f} length {m['length']:.1f}")
    med = " ".join(f"{k}={statistics.median(v):.3f}s" for k, v in phases.items())
    print(f"[a3po] median phases on {device}: {med}; peak memory {_peak_mib(device):.0f} MiB")
    first, last = statistics.mean(rewards[:5]), statistics.mean(rewards[-5:])
    print(f"[a3po] mean reward, first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    assert last > first, "A3PO did not raise the reward in 20 steps"


def vllm_matches_hf(device: str) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("[vllm] not importable: skipped")
        return
    from engine.model.policy import load_policy, resolve_model_path
    from engine.rollout.base import SamplingParams
    from engine.rollout.hf import HFBackend
    from engine.rollout.vllm import VLLMBackend
    from engine.tasks.problems import load_problems

    model, tok, _ = load_policy("builtin:tiny-countdown", device=device)
    prompts = [
        tok(p.prompt, add_special_tokens=False)["input_ids"] for p in load_problems("builtin:countdown", "test")[:8]
    ]
    sp = SamplingParams(n=1, temperature=0.0, max_new_tokens=48)
    hf = HFBackend(model, tok).generate(prompts, sp)
    vl = VLLMBackend(model, tok, model_path=resolve_model_path("builtin:tiny-countdown"), seed=0).generate(prompts, sp)
    same = [
        tok.decode(a[m.bool()]) == tok.decode(b[k.bool()])
        for a, m, b, k in zip(hf.response_ids, hf.response_mask, vl.response_ids, vl.response_mask)
    ]
    print(f"[vllm] greedy outputs equal to HF on {sum(same)}/8 prompts")
    assert all(same), "vLLM greedy outputs differ from HF"


def fast_forward_matches(device: str) -> None:
    from engine.model.policy import load_policy
    from engine.rollout.base import SamplingParams
    from engine.rollout.kv import KVEngine
    from engine.tasks.problems import load_problems
    from engine.train.evaluate import encode_prompts
    from engine.train.trainer import response_logits

    model, tok, _ = load_policy("builtin:tiny-countdown", device=device, dtype="bfloat16")
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train", limit=8))
    ro = KVEngine(model, tok).generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=48, seed=0))
    m = ro.response_mask.bool()
    secs, err = {}, {}
    with torch.no_grad():  # the same weights in float32: the truth both bf16 computations approximate
        exact = token_logprobs(response_logits(model.float(), ro, 1.0, False), ro.response_ids).float()
    model.to(torch.bfloat16)
    for fast in (False, True):
        _sync(device)
        t0 = time.perf_counter()
        logits = response_logits(model, ro, 1.0, fast)
        lp = token_logprobs(logits, ro.response_ids, mask=ro.response_mask)
        (lp * ro.response_mask).sum().backward()
        _sync(device)
        secs[fast] = time.perf_counter() - t0
        err[fast] = (lp.detach().float() - exact).abs()[m]
        model.zero_grad(set_to_none=True)
    print(
        f"[fast_forward] {int(m.sum())} response tokens, bf16 |log-prob - float32|: model's forward mean "
        f"{err[False].mean():.2e} max {err[False].max():.2e}, fast_forward mean {err[True].mean():.2e} max "
        f"{err[True].max():.2e}; forward+backward {secs[False]:.3f}s (model) vs {secs[True]:.3f}s (fast_forward)"
    )
    # two bf16 computations of the same math round differently (the rotary embedding, say, is bf16 in the
    # model's forward and float32 in ours), so each is held to the float32 truth: ours no worse than the model's
    ok = float(err[True].mean()) <= 1.25 * float(err[False].mean()) + 1e-4
    ok = ok and float(err[True].max()) <= 1.25 * float(err[False].max()) + 0.0625
    assert ok, "fast_forward in bf16 is further from the float32 forward than the model's own bf16 forward"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the same checks on the CPU (smaller sizes)")
    a = ap.parse_args()
    if a.cpu:
        torch.set_num_threads(2)
        print("CPU check, torch", torch.__version__)
        chunked_vs_full("cpu", N=512)
        a3po_run("cpu", steps=20, prompts=8, n=8)
        vllm_matches_hf("cpu")
        fast_forward_matches("cpu")
    else:
        assert torch.cuda.is_available(), "no CUDA device (use --cpu for the CPU variant)"
        print(torch.cuda.get_device_name(0), "torch", torch.__version__)
        chunked_vs_full("cuda")
        a3po_run("cuda", steps=20, prompts=32, n=8)
        vllm_matches_hf("cuda")
        fast_forward_matches("cuda")
    print("gpu check: ok")


if __name__ == "__main__":
    main()
