"""Plug-ins that bring A3PO shaping and the per-token store to other training stacks (TRL)."""
