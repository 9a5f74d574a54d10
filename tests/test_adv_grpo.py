"""Adversarial reward co-training (Adv-GRPO) in flow_grpo: the adv_dino head learns against its
reference images while GRPO trains the generator; its weights, optimiser state and sampling generator
live in the run's checkpoints, so a stopped run resumes with the head bit for bit; the latent PRM of
guided GRPO is checkpointed the same way."""

from __future__ import annotations

import pytest
import torch

from align.training.checkpoint_files import read_part
from align.config import load_config
from align.trainers import trainer_module
from rewards.tiny import TINY_DINO

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("refs")
    done = subprocess.run([sys.executable, "scripts/make_reference_digits.py", str(folder / "thick_blue"),
                           "--count", "16", "--tiny-dino", str(folder / "dino.pth")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((folder / "thick_blue").glob("*.png"))) == 16
    return folder


def _config(out, references, *extra):
    adv = {"name": "adv_dino", "reference_dir": str(references / "thick_blue"), "checkpoint": str(references / "dino.pth"),
           **TINY_DINO, "hidden": 16, "lr": 1e-3, "num_patches": 4, "updates_per_step": 2}
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "prompts=[a digit 3,a digit 5]", "eval_prompts=[a digit 3]", "rollout.num_steps=4", "group_size=2",
        "prompts_per_iteration=2", "eval.per_prompt=1", "eval.num_steps=2", "run.log_with=none", "run.progress=false",
        "lora.rank=2", "run.checkpoint_every=1", "ppo.clip_range=0.2", "ppo.kl_beta=0", f"run.output_dir={out}", *extra])
    config.rewards = [adv]
    return module, config


def _head_state(folder):
    return read_part(folder, "state")["trainer"]["reward_states"]["rewards.adv_dino"]


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: tree}


def test_head_learns_and_resumes_bit_identically(tmp_path, references):
    module, config = _config(tmp_path / "straight", references, "iterations=2")
    module.train(config)
    straight = _head_state(tmp_path / "straight" / "checkpoints" / "iteration-000002")
    assert straight["head_updates"] == 4 and straight["generator_steps"] == 2  # 2 head updates per generator update

    module, config = _config(tmp_path / "stopped", references, "iterations=1")
    module.train(config)  # stops after iteration 1 (its checkpoint), then the same folder continues
    first = _head_state(tmp_path / "stopped" / "checkpoints" / "iteration-000001")
    module, config = _config(tmp_path / "stopped", references, "iterations=2")
    module.train(config)
    resumed = _head_state(tmp_path / "stopped" / "checkpoints" / "iteration-000002")

    a, b = _flat(straight), _flat(resumed)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    # the head moved from its first state: it is trained, not merely saved
    moved = [k for k in a if k.startswith(".head.") and not torch.equal(a[k], _flat(first)[k])]
    assert moved


def test_latent_prm_guidance_trains_alongside_and_is_checkpointed(tmp_path):
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "prompts=[a red digit 3]", "eval_prompts=[a red digit 3]", "rollout.num_steps=4", "group_size=4",
        "prompts_per_iteration=1", "eval.per_prompt=1", "eval.num_steps=2", "run.log_with=none",
        "run.progress=false", "lora.rank=2", "iterations=2", "run.checkpoint_every=1", f"run.output_dir={tmp_path}",
        "guidance.rewards=[{name: latent_prm, in_channels: 3, width: 8}]", "guidance.on=latents",
        "guidance.beta=0.1", "process_weight=0.5"])
    module.train(config)
    one = read_part(tmp_path / "checkpoints" / "iteration-000001", "state")["trainer"]["reward_states"]
    two = read_part(tmp_path / "checkpoints" / "iteration-000002", "state")["trainer"]["reward_states"]
    prm1, prm2 = one["guidance.latent_prm"], two["guidance.latent_prm"]
    assert "optimizer" in prm2 and prm2["optimizer"]["state"]
    assert any(not torch.equal(prm1["model"][k], prm2["model"][k]) for k in prm1["model"])  # it fits every iteration
    lines = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "guidance.latent_prm/loss" in line]
    assert len(lines) == 2
