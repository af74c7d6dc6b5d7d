"""The policy network: loading it (``policy``), its per-token math (``ops``), the fast forward and decode
step for Llama-family models (``fast_forward``, with the C kernels of ``cpu_kernels`` and ``csrc/``), and
the helper processes that share its parameters (``workers``). Rollout and update both build on this room;
it imports nothing from them.
"""
