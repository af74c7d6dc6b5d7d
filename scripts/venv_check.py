"""Check that every file pip installed into this environment is on disk; reinstall a distribution that lost one.

Why: once, in a fresh ``make install-vllm`` here, ``apache-tvm-ffi``'s compiled ``tvm_ffi/core*.so`` was
listed in the wheel's RECORD but missing from disk, and every vLLM import then failed with "cannot
import name 'core' from partially initialized module 'tvm_ffi'". The cause was not found (the next
fresh install was complete). So the vLLM environment checks itself after installing: each distribution
whose RECORD names a file that is not there is reinstalled from its wheel (``--force-reinstall
--no-deps``, same version), and the script fails if one is still incomplete.

    .venv-vllm/bin/python scripts/venv_check.py [--import vllm.entrypoints.llm]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def incomplete(path: list[str] | None = None) -> dict[str, list[str]]:
    """``{distribution==version: [missing files]}`` over every distribution with a RECORD on ``path``
    (default: this environment's ``sys.path``)."""
    out: dict[str, list[str]] = {}
    for dist in metadata.distributions(**({"path": path} if path is not None else {})):
        record = dist.read_text("RECORD")
        if not record:
            continue
        base = Path(dist.locate_file(""))
        missing = [row[0] for row in csv.reader(record.splitlines()) if row and not (base / row[0]).exists()]
        # an editable install records its .pth and finder, not the source tree; caches are never recorded
        missing = [m for m in missing if "__pycache__" not in m]
        if missing:
            out[f"{dist.metadata['Name']}=={dist.version}"] = missing
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--import", dest="imports", action="append", default=[], help="a module that must import")
    a = ap.parse_args()
    bad = incomplete()
    for spec, files in bad.items():
        print(f"venv_check: {spec} lacks {len(files)} installed file(s), e.g. {files[0]} — reinstalling it")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", spec], check=True
        )
    still = incomplete()
    if still:
        spec, files = next(iter(still.items()))
        print(f"venv_check: {spec} still lacks {files[0]} after reinstalling — recreate the environment")
        return 1
    for name in a.imports:
        importlib.import_module(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
