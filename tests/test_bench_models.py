"""The parameter counts of bench/real_models.py come from the released configs (built on the meta device).
Every benchmark's tiny run is in tests/test_bench_suite.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_real_models_counts_the_released_configs():
    lines = _run("bench/real_models.py", "--only", "z_image,flux2_klein")
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith("| ") and "B |" in line}
    # Z-Image's 6.15B single-stream transformer and FLUX.2 klein 4B's 3.88B, counted from their configs
    assert rows["Z-Image(-Turbo)"][2].strip() == "6.15B" and rows["FLUX.2 klein 4B"][2].strip() == "3.88B"
    lora, lora_offload, full = (float(rows["Z-Image(-Turbo)"][i]) for i in (5, 6, 7))
    # offloading frees the 4.0B Qwen3 encoder's bf16 weights: 2 bytes x 4.02e9 = 7.5 GiB
    assert lora - lora_offload == pytest.approx(4.02e9 * 2 / 2**30, abs=0.1)
    assert full > lora
    assert lines[-1] == "lora_offload_fits_80gib=2/2"
