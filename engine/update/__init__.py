"""The policy update: the clipped surrogate, KL penalties and loss aggregation (``loss``), and the unit of
work that runs them, a share of a mini-batch forwarded and back-propagated (``shares``), in the trainer or
in the worker pool's helpers.
"""
