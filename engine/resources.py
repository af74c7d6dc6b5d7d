"""Where the shipped files live: the demo configs, the tiny models, the task data and the seeded store.

Why a module of its own: the repository keeps them in top-level ``configs/`` and ``data/`` folders
(easy to browse, diff and rebuild), but an installed wheel has no repository around ``engine/``.
``pyproject.toml`` therefore maps the two folders to the packages ``a3po_configs`` and ``a3po_data``
(``[tool.setuptools.package-dir]``, with ``package-data`` globs), so a wheel carries them into
site-packages and ``importlib.resources`` finds them in all three ways the project runs:

* a regular install (``pip install .`` or the wheel): the files inside site-packages;
* an editable install (``pip install -e .``, what ``make install`` does): setuptools' editable finder
  maps the two packages back onto the checkout's folders;
* a bare checkout on ``PYTHONPATH`` (no install): the packages do not import, and the folders next to
  ``engine/`` are used.

Shipped files are read, never written: commands that write (``a3po build-tiny-model``, the app's
launched jobs) write into the checkout only when there is one, else where the user says.

    python -c "from engine.resources import data_dir; print(data_dir())"
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def _package_dir(package: str, fallback: str) -> Path:
    """The folder of resource package ``package``; the checkout's ``fallback`` folder when it does not import."""
    from importlib import resources

    # engine/ inside a source checkout: take the folder from that same tree, so a checkout on
    # PYTHONPATH never mixes its code with another checkout's data (an editable install elsewhere).
    if (CHECKOUT_ROOT / "pyproject.toml").exists() and (CHECKOUT_ROOT / fallback / "__init__.py").exists():
        return CHECKOUT_ROOT / fallback
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        return CHECKOUT_ROOT / fallback
    path = Path(str(root))
    if not path.is_dir():  # a zip import: the shipped model must be real files for transformers to load
        raise RuntimeError(f"package {package} is not installed as plain files ({root}); install the wheel unzipped")
    return path


@cache
def data_dir() -> Path:
    """Shipped data: ``tiny-countdown/``, ``tiny-model/``, ``countdown/``, ``arith/``, ``store/``, ``study-quick/``."""
    return _package_dir("a3po_data", "data")


@cache
def configs_dir() -> Path:
    """Shipped run configs (``demo.yaml`` ...)."""
    return _package_dir("a3po_configs", "configs")


@cache
def app_dir() -> Path:
    """The Streamlit app's folder (``main.py`` and ``pages/``), a regular package."""
    return _package_dir("app", "app")


def demo_config() -> Path:
    return configs_dir() / "demo.yaml"


def in_checkout() -> bool:
    """True when running from a source checkout (editable install or PYTHONPATH), False from a wheel."""
    return (CHECKOUT_ROOT / "pyproject.toml").exists() and data_dir() == CHECKOUT_ROOT / "data"
