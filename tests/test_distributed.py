"""Two CPU processes (DDP over gloo), started by ``accelerate launch`` with the shipped
``configs/accelerate/multi_cpu.yaml`` and by torchrun: gathered rewards, global NFE, checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


LAUNCHERS = {
    "accelerate": ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/multi_cpu.yaml"),
                   "--main_process_port", "29518"],
    "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", "29517"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_flow_grpo_runs_on_two_processes(tmp_path, launcher):
    program, *options = LAUNCHERS[launcher]
    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / program), *options, "-m", "align", "train", "flow_grpo",
               "--config", str(ROOT / "configs/quickstart.yaml"), "iterations=2", f"run.output_dir={out}",
               "run.progress=false", "run.eval_per_prompt=2", "run.checkpoint_every=1", "run.log_with=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward before=" in done.stdout
    nfe = [json.loads(line)["nfe"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "nfe" in json.loads(line)]
    per_process = 4 * 8 * 10  # prompts x group x steps
    assert nfe == [2 * per_process, 4 * per_process]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iteration-000001", "iteration-000002"]
