"""The one error type every layer raises for a bad setting: ``ConfigError`` (its message names the key).

Why a module of its own: the config (``engine/config.py``) sits above the stages, because it lists their
choices (algorithms, backends, verifiers, aggregation modes). A stage that finds a bad value at run time
(the kv engine's ``rollout.workers`` on a GPU, the tiny-model builder's arguments) raises the same error
the config would, and the CLI reports both as one line. ``engine.config.ConfigError`` is this class.
"""


class ConfigError(ValueError):
    """A malformed or invalid configuration (message names the key)."""
