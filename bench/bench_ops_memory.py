"""Peak memory of per-token log-prob + entropy on a Qwen-size vocabulary: chunked vs a full softmax.

Three variants: ``chunked`` (``token_logprobs`` then ``token_entropy``, two passes over the logits),
``fused`` (``token_logprobs_entropy``: one log-softmax per chunk gives both), ``full`` (one float32
softmax over the whole batch, the unbounded baseline).

Why: at 151,936 vocabulary entries and thousands of response tokens a float32 softmax over the
whole batch costs many GB; ``engine.model.ops`` works in row chunks. Each variant runs in a fresh
process and reports its peak resident memory above the logits themselves (CPU; on CUDA see
scripts/gpu_check.sh).

    python bench/bench_ops_memory.py [--tokens 4096] [--vocab 151936]
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(kind: str, tokens: int, vocab: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from engine.model.ops import token_entropy, token_logprobs, token_logprobs_entropy

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16).mul_(3)  # no float32 temporary before the baseline
    labels = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "chunked":
        lp, ent = token_logprobs(logits, labels, chunk_size=256), token_entropy(logits, chunk_size=256)
    elif kind == "fused":
        lp, ent = token_logprobs_entropy(logits, labels, chunk_size=256)
    else:
        logp = torch.log_softmax(logits.float(), -1)
        lp = logp.gather(-1, labels[:, None]).squeeze(-1)  # noqa: F841  (timed, not used)
        ent = -(logp.exp() * logp).sum(-1)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{kind:8s} extra peak {(peak - base) / 2**20:7.2f} GiB  time {dt:6.2f} s  mean entropy {float(ent.float().mean()):.4f}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.tokens, a.vocab)
    print(f"{a.tokens} tokens x {a.vocab} vocabulary, bf16 logits = {a.tokens * a.vocab * 2 / 2**30:.2f} GiB")
    for kind in ("chunked", "fused", "full"):
        subprocess.run(
            [sys.executable, __file__, "--child", kind, "--tokens", str(a.tokens), "--vocab", str(a.vocab)], check=True
        )


if __name__ == "__main__":
    main()
