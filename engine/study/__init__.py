"""The sample-polarity study: paired-seed statistics and verdicts (``stats``), the study's settings and
presets (``design``), the runner that launches them through the CLI (``runner``) and the report and
claims table written from the store (``report``).
"""
