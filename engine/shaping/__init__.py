"""The shaping core: group advantages and token-level shaping (``advantage``), the registry of named
algorithms that combine them (``algorithms``: GRPO, DAPO, A3PO and the paper's baselines), and the replay
of a rule on stored rollouts (``replay``). The trainer, the app's playground, TRL and verl all shape
through ``algorithms.shape_tokens``, so there is one formula for each rule.
"""
