"""A3PO Lab training engine.

The pure tensor functions live in ``advantage``, ``loss`` and ``ops``; the trainer, rollout
backends, verifier and the DuckDB/Parquet store build on them. Import the submodules directly,
e.g. ``from engine.advantage import token_shaping``.
"""

__version__ = "0.1.0"

import os as _os

# Library progress bars (weight loading, shard writing) would interleave with ours.
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
