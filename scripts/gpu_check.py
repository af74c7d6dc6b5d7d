"""GPU check: a few training steps on CUDA, step time by phase, peak memory, chunked-vs-full
log-prob/entropy on a 150k vocabulary, and the vLLM backend when vllm is importable.

    bash scripts/gpu_check.sh          # < 8 minutes on one GPU, no internet needed
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.ops import token_entropy, token_logprobs  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def train_steps(backend: str, steps: int = 5) -> None:
    cfg = load_config(None, [f"rollout.backend={backend}", "model.device=cuda", "model.dtype=bfloat16",
                             "train.prompts_per_step=32", "rollout.n=8", f"train.steps={steps}", "eval.n_prompts=32",
                             "train.eval_every=0", "train.save_final_model=false"])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Store(d), log=lambda s: None)
        torch.cuda.reset_peak_memory_stats()
        for s in range(1, steps + 1):
            m, tables = tr.step(s)
            tr.store.write_step(tr.run_id, s, tables)
            phases = " ".join(f"{k[2:]}={v:.3f}s" for k, v in m.items() if k.startswith("t_"))
            print(f"[{backend}] step {s}: reward {m['reward']:.3f} entropy {m['entropy']:.4f} {phases}")
        print(f"[{backend}] peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def chunked_vs_full(V: int = 151_936, N: int = 4096) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    lp_c, ent_c = token_logprobs(logits, labels, chunk_size=512), token_entropy(logits, chunk_size=512)
    torch.cuda.synchronize()
    t_c, peak_c = time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    full = logits.float()
    logp = torch.log_softmax(full, -1)
    lp_f = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent_f = -(logp.exp() * logp).sum(-1)
    err_lp = (lp_c.float() - lp_f).abs().max().item()
    err_ent = (ent_c.float() - ent_f).abs().max().item()
    print(f"vocab {V}, {N} tokens: chunked {t_c * 1000:.1f} ms, extra peak {peak_c / 2**20:.0f} MiB "
          f"(a full float32 softmax is {N * V * 4 / 2**20:.0f} MiB); max |diff| logprob {err_lp:.2e}, entropy {err_ent:.2e}")
    assert err_lp < 0.05 and err_ent < 0.05, "chunked results disagree with the full computation"


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    chunked_vs_full()
    train_steps("hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm not importable: vLLM backend skipped")
    else:
        train_steps("vllm")
