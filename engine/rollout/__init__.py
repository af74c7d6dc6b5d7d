"""Rollout: prompts in, G sampled responses per prompt out, with per-token log-probs and entropies.

``base`` is the interface every backend shares (``SamplingParams``, ``Rollouts``, padding helpers);
``hf``, ``kv`` and ``vllm`` are the backends, and ``registry.make_backend`` builds the one that
``rollout.backend`` names.
"""
