"""bench/gpu.sh, the GPU benchmark, runs every part at a tiny size on the CPU (--cpu-smoke), so it
cannot rot: each part's figure line reaches the summary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for part, figure in [("expected", "expected_static_gib_sd35m_lora="), ("triton_step", "triton_vs_eager_step="),
                         ("rollout", "rollout_vs_diffusers="), ("rollout_compiled", "rollout_vs_diffusers="),
                         ("flow_grpo", "flow_grpo_iteration_vs_reference="),
                         ("attention", "attention_backends_run=")]:
        assert f"{part}: {figure}" in summary, summary
        assert (tmp_path / f"{part}.txt").read_text().strip().splitlines()[-1].startswith(figure)
    assert "rollout memory: peak" in summary and "flow_grpo memory: peak" in summary
    attention = (tmp_path / "attention.txt").read_text()
    assert "native (SDPA)" in attention and "max |diff| vs SDPA 0.00e+00" in attention
    assert "worst max |diff| fused vs eager" in (tmp_path / "triton_step.txt").read_text()
