"""Two CPU processes (DDP over gloo), started by ``accelerate launch`` with the shipped
``configs/accelerate/multi_cpu.yaml`` and by torchrun: gathered rewards, global NFE, checkpoints."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port free now, for a launch's rendezvous (tests may launch at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(processes: int = 2) -> list[str]:
    """torchrun with ``processes`` processes on a free rendezvous port."""
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes), "--master_port",
            str(free_port())]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` (one thread per process) and assert it succeeded."""
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = [*torchrun_launcher(processes), "-m", "align"] if processes > 1 else [sys.executable, "-m", "align"]
    return launch([*launcher, *args])


def torchrun_commands(*commands: list[str]) -> subprocess.CompletedProcess:
    """Several ``align`` commands one after another in one launch of two processes (tests/ddp_rank_reward.py,
    which also registers the ``rank_split`` reward)."""
    joined = [word for command in commands for word in ("+", *command)][1:]
    return launch([*torchrun_launcher(), str(ROOT / "tests" / "ddp_rank_reward.py"), *joined])


LAUNCHERS = {
    "accelerate": ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/multi_cpu.yaml"),
                   "--main_process_port", str(free_port())],
    "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_flow_grpo_runs_on_two_processes(tmp_path, launcher):
    program, *options = LAUNCHERS[launcher]
    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / program), *options, "-m", "align", "train", "flow_grpo",
               "--config", str(ROOT / "configs/quickstart.yaml"), "iterations=2", f"run.output_dir={out}",
               "run.progress=false", "eval.per_prompt=2", "run.checkpoint_every=1", "run.log_with=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward before=" in done.stdout
    nfe = [json.loads(line)["nfe"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "nfe" in json.loads(line) and "eval/reward" not in json.loads(line)]  # iterations, not evaluations
    per_process = 4 * 8 * 10  # prompts x group x steps
    assert nfe == [2 * per_process, 4 * per_process]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iteration-000001", "iteration-000002"]


#: trainer -> overrides; process 1's rewards are all equal, so every one of its groups is dropped
UNEVEN = {
    "flow_grpo": ["group_size=4", "train_batch_size=2"],
    "tempflow_grpo": ["group_size=1", "branches_per_step=2", "steps_per_iteration=2"],
    "branch_grpo": ["rollout.split_steps=[0,2]", "trees_per_prompt=1"],
    "d3po": ["group_size=2"],  # process 1: every pair tied, no pair to train
}


@pytest.mark.slow
def test_processes_whose_groups_are_all_dropped_keep_step_with_the_others(tmp_path):
    """DDP all-reduces in every backward: a process with nothing to train must still run the same
    forward / backward calls (with weight 0), or the other process waits forever. Every trainer of
    UNEVEN in turn, in one launch of two processes."""
    torchrun_commands(*(["train", trainer, "model.name=toy", "rewards=[rank_split]", "iterations=2",
                         "prompts_per_iteration=2", "rollout.num_steps=4", "rollout.guidance_scale=1.0",
                         "eval_prompts=['a red digit 3']", "eval.per_prompt=1", f"run.output_dir={tmp_path / trainer}",
                         "run.resume=null", "run.progress=false", "run.log_with=none", "run.checkpoint_every=0",
                         *UNEVEN[trainer]] for trainer in sorted(UNEVEN)))
    for trainer in sorted(UNEVEN):
        rows = [json.loads(line) for line in (tmp_path / trainer / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in rows if "train/grad_norm" in m] == [1, 2], trainer


@pytest.mark.slow
def test_gradient_accumulation_all_reduces_only_on_the_last_minibatch_of_a_window(tmp_path):
    """DDP's no_sync on all but the last backward of an accumulation window (run.accumulate): with
    K = 3, six minibatches all-reduce twice (each time every gradient bucket), not six times."""
    command = [*torchrun_launcher(),
               str(ROOT / "tests" / "ddp_allreduce_probe.py"), str(tmp_path / "run"), "3"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(part for part in done.stdout.splitlines() if part.startswith("allreduces="))
    counts = dict(item.split("=") for item in line.split())
    buckets = int(counts["buckets_per_sync"])
    assert buckets >= 1 and int(counts["allreduces"]) == 2 * buckets and int(counts["minibatches"]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_a_checkpoint_of_one_process_layout_resumes_in_the_other(tmp_path, first, second):
    """The checkpoint holds the trainable weights, optimizer and run state, none of them per process:
    a run checkpointed by two processes continues in one, and the other way round."""
    out = tmp_path / "run"

    def train(processes: int, iterations: int):
        launcher = [*torchrun_launcher(processes), "-m", "align"] if processes > 1 else [sys.executable, "-m", "align"]
        command = [*launcher, "train", "flow_grpo", "--config", str(ROOT / "configs/quickstart.yaml"),
                   f"iterations={iterations}", "group_size=4", "rollout.num_steps=4", "eval.per_prompt=1",
                   f"run.output_dir={out}", "run.resume=auto", "run.progress=false", "run.checkpoint_every=1",
                   "run.log_with=none"]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    train(first, 1)
    train(second, 2)
    assert "at iteration 1 (from iteration-000001)" in (out / "log.txt").read_text()  # resumed, not restarted
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train/loss" in r] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iteration-000001", "iteration-000002"]


@pytest.mark.slow
def test_every_trainer_runs_on_two_processes_and_keeps_the_replicas_identical(tmp_path):
    """All twelve trainers, one after another in the same two DDP processes (tests/ddp_every_trainer.py):
    each trains 2 iterations and checkpoints both, its weights change, and the two processes end
    with the same weights although each trained on its own samples (every gradient all-reduced)."""
    from align.trainers import TRAINERS

    command = [*torchrun_launcher(),
               str(ROOT / "tests" / "ddp_every_trainer.py"), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {}
    lines = [line for rank in (0, 1) for line in (tmp_path / f"report-rank{rank}.txt").read_text().splitlines()]
    for line in lines:
        if line.startswith("trainer="):
            fields = dict(item.split("=", 1) for item in line.split())
            reports.setdefault(fields["trainer"], {})[fields["rank"]] = fields
    assert sorted(reports) == sorted(TRAINERS)
    for name, ranks in reports.items():
        assert sorted(ranks) == ["0", "1"], name
        assert ranks["0"]["after"] == ranks["1"]["after"], f"{name}: the replicas diverged"
        assert ranks["0"]["before"] == ranks["1"]["before"] != ranks["0"]["after"], f"{name}: nothing trained"
        assert ranks["0"]["iterations"] == "2", name
        assert (tmp_path / name / "checkpoints" / "iteration-000002").is_dir(), name


def lora_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next((run_dir / "lora").glob("*.safetensors")))


@pytest.mark.slow
def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """Flow-GRPO, 2 prompts x 4 samples per iteration: two processes of one prompt each against one
    process rolling the two prompts out in two chunks. A chunk's noise is keyed by its place in the
    global batch, so both sample the same; the logged rewards then agree to 1e-5 and the trained LoRA
    to 1% of the learning rate (measured: 0.2%, 3.8e-6). What differs is float summation order only
    (the all-reduce of two half-batch gradients against one batch's mean, re-scores of 8 rows
    against the rollout's 4: ~1e-7 relative), which Adam amplifies in the elements whose gradient is
    near its eps, since it divides each element by its own magnitude."""
    common = ["train", "flow_grpo", "--config", str(ROOT / "configs/quickstart.yaml"), "iterations=2",
              "group_size=4", "rollout.num_steps=4", "eval.per_prompt=1", "run.resume=null", "run.progress=false",
              "run.checkpoint_every=0", "run.log_with=none", "ppo.kl_beta=0.04"]
    runs = {
        "two": ([*torchrun_launcher(),
                 "-m", "align"], ["prompts_per_iteration=1", "run.rollout_chunks=1"]),
        "one": ([sys.executable, "-m", "align"], ["prompts_per_iteration=2", "run.rollout_chunks=2"]),
    }
    metrics, weights = {}, {}
    for name, (launcher, layout) in runs.items():
        out = tmp_path / name
        done = subprocess.run([*launcher, *common, *layout, f"run.output_dir={out}"], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                         if "train/loss" in line]
        weights[name] = lora_tensors(out)
    assert len(metrics["one"]) == len(metrics["two"]) == 2
    for a, b in zip(metrics["one"], metrics["two"]):
        assert a["nfe"] == b["nfe"]
        assert a["reward/score/mean"] == pytest.approx(b["reward/score/mean"], abs=1e-5)
    assert sorted(weights["one"]) == sorted(weights["two"])
    moved = max(float((weights["one"][k] - weights["two"][k]).abs().max()) for k in weights["one"])
    trained = max(float(t.abs().max()) for k, t in weights["one"].items() if "lora_B" in k)  # B starts at 0
    lr = 0.002  # configs/quickstart.yaml
    assert moved <= 0.01 * lr, f"max |one - two| = {moved:.3g}, 1% of the learning rate is {0.01 * lr:.3g}"
    assert trained > 100 * moved  # the two updates moved the LoRA far more than the layouts differ




@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp2_fully_shard_trains_as_ddp_saves_whole_weights_and_resumes(tmp_path, lora):
    """run.fully_shard on two CPU processes (FSDP2 over gloo; accelerate runs CPU processes as DDP):
    the toy model's 8 blocks and root are sharded; a LoRA run and a full fine-tune (reference: a
    frozen copy) train 2 iterations to what DDP trains (1% of the learning rate, as the 1-vs-2
    process test), the checkpoints and the LoRA export hold whole tensors, and a third iteration
    resumes from the sharded run's checkpoint. The reference under sharding (LoRA: the adapter
    switched off) gives the KL that DDP's gives once the policy has moved (iteration 2)."""
    from align.training.checkpoint_files import read_part

    common = ["train", "flow_grpo", "--config", str(ROOT / "configs/quickstart.yaml"), "group_size=4",
              "rollout.num_steps=4", "eval.per_prompt=1", "run.progress=false", "run.checkpoint_every=1",
              "run.log_with=none", "ppo.kl_beta=0.04", f"lora.enabled={lora}"] + ([] if lora else ["optim.lr=0.0002"])
    lr = 0.002 if lora else 0.0002
    sharded, ddp = tmp_path / "sharded", tmp_path / "ddp"
    # one launch of two processes: the sharded run, the same under DDP, then the sharded run resumed
    # for a third iteration (its checkpoint of iteration 2 stays: checkpoint_limit 2)
    torchrun_commands([*common, "iterations=2", "run.fully_shard=true", f"run.output_dir={sharded}"],
                      [*common, "iterations=2", f"run.output_dir={ddp}"],
                      [*common, "iterations=3", "run.fully_shard=true", "run.resume=auto", f"run.output_dir={sharded}"])
    assert "fully_shard: 9 modules sharded over 2 processes (FSDP2)" in (sharded / "log.txt").read_text()
    weights = {name: read_part(run / "checkpoints" / "iteration-000002", "trainable") for name, run in
               (("sharded", sharded), ("ddp", ddp))}
    assert sorted(weights["sharded"]) == sorted(weights["ddp"])
    for key, value in weights["ddp"].items():
        assert weights["sharded"][key].shape == value.shape, key  # whole tensors, not shards
    moved = max(float((weights["sharded"][k] - weights["ddp"][k]).abs().max()) for k in weights["ddp"])
    assert moved <= 0.01 * lr, f"max |sharded - ddp| = {moved:.3g}"
    optimizer = read_part(sharded / "checkpoints" / "iteration-000002", "optimizer")
    assert all(state["exp_avg"].shape == weights["ddp"][name].shape for state, name in
               zip((optimizer["state"][k] for k in sorted(optimizer["state"], key=int)), weights["ddp"]))
    kl = {name: [json.loads(line)["train/kl"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if "train/kl" in line] for name, run in (("sharded", sharded), ("ddp", ddp))}
    assert kl["sharded"][1] > 0 and kl["sharded"][1] == pytest.approx(kl["ddp"][1], rel=1e-2)  # reference: LoRA off
    if lora:
        exported = lora_tensors(sharded)
        assert all(t.shape == lora_tensors(ddp)[k].shape for k, t in exported.items())
    assert "at iteration 2 (from iteration-000002)" in (sharded / "log.txt").read_text()
    rows = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert [r["iteration"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_a_trainer_with_a_weight_snapshot_is_refused_on_sharded_weights(tmp_path):
    """DiffusionNFT keeps an old policy (a snapshot of the weights): on FSDP2 shards it stops in one
    line naming run.fully_shard, on both processes, before any iteration."""
    command = [*torchrun_launcher(),
               "-m", "align", "train", "diffusion_nft", "--config", str(ROOT / "configs/methods/diffusion_nft.yaml"),
               "iterations=1", "rollout.num_steps=4", "prompts_per_iteration=2", f"run.output_dir={tmp_path}",
               "run.log_with=none", "run.progress=false", "run.fully_shard=true"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if line.startswith("align: config error: run.fully_shard:")]
    assert len(refusals) == 2 and "snapshot of the weights" in refusals[0]
    assert not (tmp_path / "metrics.jsonl").exists() or "train/loss" not in (tmp_path / "metrics.jsonl").read_text()
