"""The run store: the one record schema (``schema``: tables, columns, step metrics, run.json fields) and the
append-only Parquet store read through DuckDB (``store``). Writers are the trainer and the TRL and verl
integrations; readers are the app, the study and the CLI.
"""
