"""A3PO Lab training engine.

The pure tensor functions live in ``advantage``, ``loss`` and ``ops``; the trainer, rollout
backends, verifier and the DuckDB/Parquet store build on them. Import the submodules directly,
e.g. ``from engine.advantage import token_shaping``.
"""

__version__ = "0.1.0"
