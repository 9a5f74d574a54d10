"""Every trainer family runs an iteration on the tiny stand-in of every model family of
``FAMILY_CASES`` (Qwen-Image, FLUX.2, Z-Image, Wan 2.2, HunyuanVideo 1.5 and the editing models):
the LoRA gets a gradient and is exported, and Flow-GRPO's first on-policy ratio is exactly 1."""

from __future__ import annotations

import dataclasses
import json

import pytest

from align.config import load_config
from align.models import load_model
from align.trainers import trainer_module

try:
    from tests.tiny_models import model_dir_cache
except ImportError:  # tests/ on sys.path
    from tiny_models import model_dir_cache

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the families of FAMILY_CASES: every trainer family runs an iteration on each --------------
try:
    from tests.tiny_models import FAMILY_CASES, build_family, family_overrides, write_family_prompts
except ImportError:  # tests/ on sys.path
    from tiny_models import FAMILY_CASES, build_family, family_overrides, write_family_prompts

#: trainer family -> its overrides (the digit classifier is differentiable: reward backprop trains on it)
FAMILY_TRAINERS = {
    "flow_grpo": ["trainer=flow_grpo", "group_size=2", "ppo.kl_beta=0.01"],
    "branch_grpo": ["trainer=branch_grpo", "rollout.split_steps=[0,2]", "trees_per_prompt=1", "ppo.kl_beta=0.01"],
    "diffusion_nft": ["trainer=diffusion_nft", "group_size=2", "t_per_sample=1"],
    # 4 rollout steps: AWM's strata cover steps 1-2, DGPO trains steps 0-2
    "awm": ["trainer=awm", "group_size=2", "t_per_sample=2"],
    "dgpo": ["trainer=dgpo", "group_size=2", "trunc_steps=2", "steps_per_iteration=2"],
    "reward_backprop": ["trainer=reward_backprop", "mode=draft", "truncation_steps=1", "rollout.kernel=ode",
                        "group_size=1"],
    "dpo": ["trainer=dpo", "group_size=2", "rollout.kernel=ode"],
    "d3po": ["trainer=d3po", "rollout.kernel=flow_grpo"],
    "raft": ["trainer=raft", "group_size=2", "rollout.kernel=ode"],
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_pipelines")
    return model_dir_cache(root, {case: (lambda _dir, case=case: build_family(case, root)) for case in FAMILY_CASES})


@pytest.mark.parametrize("trainer", sorted(FAMILY_TRAINERS))
@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_every_trainer_family_runs_on_each_family_stand_in(case, trainer, family_dirs, tmp_path):
    """One iteration of each trainer family on each new model's tiny stand-in (its real pipeline
    classes, text encoders included): the LoRA gets a gradient and is exported; Flow-GRPO's first
    on-policy ratio is exactly 1 (the re-score repeats the rollout's call)."""
    adapter_name, _, _, _, guidance, task = FAMILY_CASES[case]
    overrides = FAMILY_TRAINERS[trainer]
    prompts = ["a red digit 3", "a blue digit 5"]
    # the first frame or the edit's source travels with each prompt (a JSONL prompt file)
    extra = write_family_prompts(case, prompts, tmp_path)
    module = trainer_module(overrides[0].split("=", 1)[1])
    config = load_config(module.CONFIG, None, [
        f"model.name={adapter_name}", "model.device=cpu", *family_overrides(case), "rewards=[digit]",
        "heldout_rewards=[]", "iterations=1", f"prompts={json.dumps(prompts)}", "prompts_per_iteration=2",
        "eval_prompts=['a red digit 3']", "rollout.num_steps=4", f"rollout.guidance_scale={guidance}",
        "lora.rank=4", "lora.alpha=4", "eval.per_prompt=1", "eval.num_steps=2", "eval.kernel=ode",
        "run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0",
        f"run.output_dir={tmp_path / 'run'}", *overrides[1:], *extra])
    adapter = load_model(dataclasses.replace(config.model, path=family_dirs(case)))
    adapter.pipe.set_progress_bar_config(disable=True)
    module.train(config, adapter=adapter)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "train/loss" in m)
    if trainer in ("flow_grpo", "branch_grpo"):
        assert first["train/ratio_mean"] == 1.0 and first["train/clip_fraction"] == 0.0, first
    if trainer == "flow_grpo":
        assert first["train/on_policy_approx_kl"] == 0.0, first
    assert first["train/grad_norm"] > 0.0, first
    assert any((tmp_path / "run" / "lora").iterdir())
