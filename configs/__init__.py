"""Shipped run configs (installed as the package ``a3po_configs``; see engine/resources.py)."""
