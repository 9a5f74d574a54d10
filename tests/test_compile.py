"""``run.compile``: the compiled denoiser (traced by dynamo and AOT autograd here: the ``aot_eager``
backend, no code generation on the CPU) samples what the eager one samples, and the first
on-policy ratio of a compiled training run stays exactly 1; real models compile their repeated
blocks one by one."""

from __future__ import annotations

import json

from align.compile import compile_denoiser


def test_a_compiled_rollout_agrees_with_the_eager_one():
    import torch._dynamo

    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.toy import load_toy_adapter

    samples = {}
    for compiled in (False, True):
        adapter = load_toy_adapter()
        if compiled:
            torch._dynamo.reset()
            assert compile_denoiser(adapter, backend="aot_eager") == 1  # the toy UNet has no repeated blocks
        cond = adapter.encode(["a red digit 3", "a blue digit 8"], "", 3.0)
        with torch.no_grad():
            samples[compiled] = rollout(adapter, cond, RolloutConfig(num_steps=4, kernel="flow_grpo"), group_size=2,
                                        generator=torch.Generator().manual_seed(0))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0  # the compiled run went through dynamo
    assert torch.allclose(samples[True].samples, samples[False].samples, atol=1e-5)
    for a, b in zip(samples[True].transitions, samples[False].transitions):
        assert torch.allclose(a.log_prob, b.log_prob, atol=1e-5)


def test_a_compiled_run_starts_on_policy(tmp_path):
    from align.config import load_config
    from align.trainers import trainer_module

    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "rewards=[digit]", "iterations=1", "prompts_per_iteration=2", "rollout.num_steps=4", "group_size=4",
        "ppo.kl_beta=0.01", "run.compile=true", "run.compile_options={backend: aot_eager}", "eval.per_prompt=1",
        "eval.num_steps=2", "eval_prompts=['a red digit 3']", "heldout_rewards=[]", "run.log_with=none",
        "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp_path}"])
    module.train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "train/ratio_mean" in m)
    assert first["train/ratio_mean"] == 1.0 and first["train/clip_fraction"] == 0.0
    assert first["train/grad_norm"] > 0.0


def test_real_models_compile_their_repeated_blocks(tmp_path):
    from align.models import ModelConfig, load_model
    from tiny_models import build_flux, build_sd3

    for name, builder in (("sd3", build_sd3), ("flux", build_flux)):
        adapter = load_model(ModelConfig(name=name, path=str(builder(tmp_path / name)), device="cpu", dtype="float32"))
        base = adapter.base_denoiser
        blocks = len(base.transformer_blocks) + len(getattr(base, "single_transformer_blocks", []))
        assert compile_denoiser(adapter) == blocks  # compiled lazily: nothing runs here
