"""A training run killed with SIGKILL part-way (a real process, no chance to clean up) and resumed
with ``run.resume=latest`` ends with exactly the weights of an uninterrupted run with the same seed,
losing at most the step that was running; one stopped with Ctrl-C (SIGINT) checkpoints the iteration
it was running, exits 130 with one line saying where to resume, and resumes to the same weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 6
#: one pytest-xdist worker runs both: they share the uninterrupted run (a module fixture)
pytestmark = pytest.mark.xdist_group("kill_resume")


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "train", "flow_grpo", "--config", str(ROOT / "configs/quickstart.yaml"),
            f"iterations={ITERATIONS}", "group_size=4", "rollout.num_steps=6", "eval.per_prompt=1",
            "run.checkpoint_every=1", "run.checkpoint_limit=2", "run.progress=false", "run.log_with=none",
            f"run.output_dir={out}", *extra]


def logged_iterations(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0  # an iteration's row has nfe and no evaluation (evaluations log their nfe too)
    return sum('"nfe"' in line and '"eval/reward"' not in line for line in metrics.read_text().splitlines())


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted_lora(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    subprocess.run(command(full), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    return load_file(full / "lora" / "lora.safetensors")


def assert_same_weights(got, expected):
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, uninterrupted_lora):
    env = ENV

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while logged_iterations(killed) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before_kill = logged_iterations(killed)
    assert 3 <= done_before_kill < ITERATIONS
    # a kill during a save leaves only a hidden temporary folder, which resume ignores
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints and checkpoints[-1] >= f"iteration-{done_before_kill - 1:06d}"  # at most one step lost
    # what a kill in the middle of the next save would leave: a half-written temporary folder
    partial = killed / "checkpoints" / f".tmp-iteration-{done_before_kill + 1:06d}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"truncated")

    resumed = subprocess.run(command(killed, "run.resume=latest"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reward before=" in resumed.stdout
    assert_same_weights(load_file(killed / "lora" / "lora.safetensors"), uninterrupted_lora)


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_running_iteration_and_resumes_to_the_same_weights(tmp_path, uninterrupted_lora):
    stopped = tmp_path / "stopped"
    # no periodic checkpoints: the one resumed from is the one Ctrl-C wrote
    process = subprocess.Popen(command(stopped, "run.checkpoint_every=0"), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while logged_iterations(stopped) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    done = logged_iterations(stopped)
    assert 2 <= done < ITERATIONS
    checkpoints = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert checkpoints == [f"iteration-{done:06d}"]  # the running iteration finished and was kept
    last = stderr.strip().splitlines()[-1]
    # (the quickstart config starts over by default: run.resume null)
    assert last == (f"align: interrupted: the last checkpoint is {stopped}/checkpoints/{checkpoints[0]}; the same "
                    f"command with run.output_dir={stopped} run.resume=auto continues from it")

    resumed = subprocess.run(command(stopped, "run.resume=auto"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {stopped} at iteration {done}" in (stopped / "log.txt").read_text()
    assert_same_weights(load_file(stopped / "lora" / "lora.safetensors"), uninterrupted_lora)
