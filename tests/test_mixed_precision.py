"""bf16 autocast (accelerate's mixed precision, on the CPU here): rollouts run under the same
autocast as the training pass, so the first on-policy step re-scores every transition to exactly
its recorded log-prob (ratio 1, no clipping) and a short run still trains the LoRA."""

import json

import pytest

from align.config import load_config
from align.trainers import trainer_module
from pipelines.toy import TOY_WEIGHTS_DIR

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (TOY_WEIGHTS_DIR / "config.json").exists(), reason="toy model weights not built")]

OPTIONS = {
    "flow_grpo": ["group_size=4", "ppo.kl_beta=0.01"],
    "branch_grpo": ["rollout.split_steps=[0,2]", "trees_per_prompt=1"],
    "dense_grpo": ["group_size=4"],
    "tempflow_grpo": ["group_size=1", "branches_per_step=2", "steps_per_iteration=2"],
}
# ddpo trains UNet models only: its exact on-policy re-scoring is tested on tiny SD / SDXL (test_ddpo.py)


def run_one_iteration(trainer, out, precision="bf16", adapter=None):
    module = trainer_module(trainer)
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "rewards=[digit]", "iterations=1", "prompts_per_iteration=2", "rollout.num_steps=4",
        "rollout.guidance_scale=3.0", f"run.mixed_precision={precision}", "eval.per_prompt=2", "eval.num_steps=2",
        "eval_prompts=['a red digit 3']", "run.log_with=none", "run.resume=null", "run.progress=false",
        "run.checkpoint_every=0", f"run.output_dir={out}", *OPTIONS[trainer]])
    module.train(config, adapter=adapter)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_is_in_effect_and_close_to_fp32(tmp_path):
    """Under run.mixed_precision=bf16 the denoiser's layers compute in bf16 (seen by a forward hook on
    every Linear), in fp32 they do not; the seeded evaluation's reward moves, but by less than 0.05
    (the toy digit reward is ~0.9): mixed precision changes rounding, not the model."""
    import torch

    from pipelines.toy import load_toy_adapter

    def dtypes_seen(precision):
        adapter = load_toy_adapter()
        seen = set()
        for module in adapter.denoiser.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        rows = run_one_iteration("flow_grpo", tmp_path / precision, precision=precision, adapter=adapter)
        return seen, rows

    bf16_dtypes, bf16 = dtypes_seen("bf16")
    fp32_dtypes, fp32 = dtypes_seen("no")
    assert torch.bfloat16 in bf16_dtypes and fp32_dtypes == {torch.float32}
    assert bf16[0]["eval/reward"] != fp32[0]["eval/reward"]
    assert abs(bf16[0]["eval/reward"] - fp32[0]["eval/reward"]) < 0.05


@pytest.mark.parametrize("trainer", sorted(OPTIONS))
def test_bf16_first_on_policy_step_has_ratio_one(trainer, tmp_path):
    rows = run_one_iteration(trainer, tmp_path)
    first = next(m for m in rows if "train/ratio_mean" in m)
    on_policy = {k.removeprefix("train/on_policy_"): v for k, v in first.items() if k.startswith("train/on_policy_")}
    if on_policy:  # trainers that take several optimizer steps report the steps before the first update
        assert on_policy["approx_kl"] == 0.0 and on_policy["clip_fraction"] == 0.0, first
    else:
        assert first["train/ratio_mean"] == 1.0 and first["train/clip_fraction"] == 0.0, first
    assert first["train/grad_norm"] > 0.0
