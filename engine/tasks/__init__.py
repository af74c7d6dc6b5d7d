"""Verifiable tasks: the problems and datasets (``problems``: the embedded arithmetic and Countdown-lite
tasks, JSONL/Parquet loading), their verifiers and reward terms (``reward``), and the builder of the
shipped tiny models trained on them (``tiny_model``).
"""
