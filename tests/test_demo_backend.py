"""The demo runs on our kv rollout engine (decided by same-seed demo runs against hf, see README)."""

from pathlib import Path

from engine.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_uses_the_kv_engine():
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"))
    assert cfg.rollout.backend == "kv"
    # the recorded old-policy log-probs are used, not recomputed (what makes kv cheaper per step)
    assert cfg.actor.recompute_old_logprobs is False
