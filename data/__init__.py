"""Shipped data (installed as the package ``a3po_data``): tiny models, task splits, the seeded store.

Not code: this file only makes the folder a package so a wheel carries it and ``importlib.resources``
finds it (see engine/resources.py).
"""
