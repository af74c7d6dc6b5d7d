"""A3PO Lab training engine, one folder per pipeline stage (each imports only the ones below it).

    model/      the policy network: loading, per-token ops, fast forward, C kernels, worker pool
    shaping/    group advantages, token shaping, the algorithm registry, replay on stored rollouts
    store/      the record schema and the Parquet/DuckDB run store
    tasks/      problems, verifiers (the reward), the tiny-model builder
    rollout/    the backend interface and the hf, kv and vllm backends behind one registry
    update/     the loss and the backward of a mini-batch share
    config.py   every key of a run
    train/      the training loop and evaluation
    study/      paired-seed statistics, the study's design, runner and report
    integrations/  TRL and verl
    cli.py      the ``a3po`` command

The floors are declared in tests/test_layers.py. Import the modules directly, e.g.
``from engine.shaping.advantage import token_shaping``.
"""

__version__ = "0.1.0"

import os as _os

# Library progress bars (weight loading, shard writing) would interleave with ours.
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
