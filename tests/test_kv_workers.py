"""Rollout worker processes of the kv engine (``rollout.workers``, engine/model/workers.py).

A pool of 2 on the shipped model: its output is exactly what one process gives for each prompt share
with that share's seed, greedy output equals one process's, an in-place weight update in the trainer
reaches the helper without a copy, a dead helper is one clear error, a user's unguarded script is not
run again by the helper, and a helper whose parent is killed exits.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.model.policy import load_policy
from engine.model.workers import WorkerError, chunk_seed, split, to_arrays, to_tensors
from engine.resources import demo_config
from engine.rollout.base import Rollouts, SamplingParams
from engine.rollout.kv import KVEngine
from engine.rollout.registry import make_backend
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts
from engine.update.shares import LossSpec, Share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_and_seeds_by_hand():
    assert split(5, 2) == [slice(0, 3), slice(3, 5)]
    assert split(16, 2) == [slice(0, 8), slice(8, 16)]
    assert split(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert split(1, 4) == [slice(0, 1)]  # never an empty share
    assert chunk_seed(7, 0) == 7
    seeds = {chunk_seed(7, j) for j in range(8)} | {chunk_seed(8, j) for j in range(8)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_jobs_cross_the_pipe_as_arrays():
    """A job's tensors travel as numpy arrays inside the message (no shared-memory segment and file
    descriptor per tensor), nested in tuples and dataclasses, and come back equal, dtypes included;
    bfloat16, which numpy cannot hold, stays a tensor."""
    ro = Rollouts(
        torch.tensor([[0, 1, 5], [1, 6, 7]]),
        torch.tensor([[0, 1, 1], [1, 1, 1]]),
        torch.tensor([[8, 2], [9, 0]]),
        torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([False, True]),
        logprobs=torch.tensor([[-0.5, -0.25], [-1.0, 0.0]]),
    )
    share = Share(ro, ro.logprobs.clone(), torch.ones(2, 2), torch.full((2, 2), 1 / 3), None, None)
    spec = LossSpec(0.2, 0.28, None, 1.0, 1024, True)
    job = ("backward", share, spec, [torch.zeros(3, dtype=torch.bfloat16)])
    sent = to_arrays(job)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (tuple, list)):
            return [t for v in x for t in tensors(v)]
        if hasattr(x, "__dataclass_fields__"):
            return [t for f in x.__dataclass_fields__ for t in tensors(getattr(x, f))]
        return []

    assert [t.dtype for t in tensors(sent)] == [torch.bfloat16]  # only what numpy cannot hold
    back = to_tensors(sent)
    assert back[0] == "backward" and back[2] == spec and back[3][0].dtype == torch.bfloat16
    got, want = tensors(back[1]), tensors(share)
    assert len(got) == len(want) == 9 and back[1].rollouts.entropy is None and back[1].ref_logprobs is None
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:6])
    pool = KVEngine(model, tok, workers=2, threads=1)
    yield model, tok, prompts, pool
    pool.close()
    torch.set_num_threads(n)


def _equal(a: Rollouts, b: Rollouts, atol=1e-5):
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(a.entropy, b.entropy, atol=atol, rtol=0)


def test_pool_equals_one_process_per_share(setup):
    """Each share is sampled with its own seed; the pooled result is the shares' results concatenated."""
    model, tok, prompts, pool = setup
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=11)
    got = pool.generate(prompts, params)
    one = KVEngine(model, tok)
    shares = split(len(prompts), 2)
    want = Rollouts.concat(
        [
            one.generate(prompts[s], SamplingParams(**{**params.__dict__, "seed": chunk_seed(11, j)}))
            for j, s in enumerate(shares)
        ],
        tok.pad_token_id,
    )
    assert pool.pool is not None and pool.pool.procs[0].is_alive()  # the helper really ran a share
    _equal(got, want)
    assert got.response_ids.shape[0] == len(prompts) * 4


def test_greedy_equals_one_process(setup):
    model, tok, prompts, pool = setup
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24, seed=0)
    _equal(pool.generate(prompts, params), KVEngine(model, tok).generate(prompts, params))


def test_weight_update_reaches_the_helper(setup):
    """The optimizer updates parameters in place; the helper's module is the same shared storage."""
    model, tok, prompts, pool = setup
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=16, seed=0)
    before = pool.generate(prompts, params)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(-3.0)
        after = pool.generate(prompts, params)
        assert not torch.equal(after.response_ids, before.response_ids)  # the change matters
        _equal(after, KVEngine(model, tok).generate(prompts, params))  # and the helper's share has it
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_dead_helper_is_one_clear_error():
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
    eng = KVEngine(model, tok, workers=2, threads=1)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    try:
        eng.generate(prompts, params)
        eng.pool.procs[0].kill()
        eng.pool.procs[0].join(10)
        with pytest.raises(WorkerError, match=r"rollout worker 1 died .* resume the run, or set rollout.workers=1"):
            eng.generate(prompts, params)
    finally:
        eng.close()


def test_a_local_failure_still_drains_the_helper(setup):
    """When the calling process's share fails, its error surfaces and the helper's answer is consumed, so
    the next call gets its own results."""
    model, tok, prompts, pool = setup
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, seed=0)

    pool.generate(prompts, params)  # the helper is running

    def broken(prompts, params):
        raise ValueError("local share failed")

    pool._generate = broken  # this process's share (the helper's runs the real one)
    try:
        with pytest.raises(ValueError, match="local share failed"):
            pool.generate(prompts, params)
    finally:
        del pool._generate
    _equal(pool.generate(prompts, params), KVEngine(model, tok).generate(prompts, params))


def test_workers_need_the_kv_backend_and_a_cpu_policy():
    with pytest.raises(ConfigError, match="rollout.workers.*needs rollout.backend=kv"):
        load_config(demo_config(), ["rollout.backend=hf", "rollout.workers=2"])
    cfg = load_config(demo_config(), ["rollout.backend=kv", "rollout.workers=2"])
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    with pytest.raises(ConfigError, match="rollout.workers.*policy is on a GPU"):
        make_backend("kv", model.to("meta"), tok, cfg)


def test_a_dead_worker_is_a_one_line_cli_error():
    from engine.cli import _user_errors

    assert WorkerError in _user_errors()


def _run(script: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_unguarded_script_is_not_rerun(tmp_path):
    """A user's script without ``if __name__ == "__main__"``: the helper must not execute it again."""
    script = tmp_path / "user_script.py"
    marker = tmp_path / "ran.txt"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch
            from engine.train.evaluate import encode_prompts
            from engine.rollout.kv import KVEngine
            from engine.model.policy import load_policy
            from engine.rollout.base import SamplingParams
            from engine.tasks.problems import load_problems
            with open({str(marker)!r}, "a") as f:
                f.write("x")
            model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
            prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
            eng = KVEngine(model, tok, workers=2, threads=1)
            ro = eng.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=0))
            print("rows", ro.response_ids.shape[0])
            eng.close()
            """
        )
    )
    p = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rows 8" in p.stdout
    assert marker.read_text() == "x"  # the script body ran once, in the parent only


def test_helper_exits_when_its_parent_is_killed():
    p = _run(
        """
        import os, sys
        from engine.train.evaluate import encode_prompts
        from engine.rollout.kv import KVEngine
        from engine.model.policy import load_policy
        from engine.rollout.base import SamplingParams
        from engine.tasks.problems import load_problems
        model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
        prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:4])
        eng = KVEngine(model, tok, workers=2, threads=1)
        eng.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=0))
        print(eng.pool.procs[0].pid, flush=True)
        os._exit(0)  # no clean-up, as if killed
        """
    )
    pid = int(p.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):  # exited; only waiting to be reaped by whoever adopted it
            return
        time.sleep(0.2)
    pytest.fail(f"rollout worker {pid} outlived its parent")
