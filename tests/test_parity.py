"""Each reference convention against the project's own, in closed form: the option that selects it,
the relation between the two, and which one the defaults use (docs/parity.md lists them all)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.config import load_config
from align.losses import flow_grpo_kl, mean_kl
from align.sampling.kernels import flow_grpo_sde_step, flow_grpo_std
from align.trainers import trainer_module
from rewards.base import Reward, register_reward
from tests.conftest import GaussianAdapter


@register_reward("test_parity_brightness")
class Brightness(Reward):
    def score(self, samples, prompts, **context):
        return {"score": samples.mean(dim=(1, 2, 3))}


def configured(name, tmp_path, *extra):
    module = trainer_module(name)
    config = load_config(module.CONFIG, None, [
        "rewards=[test_parity_brightness]", "prompts=['0.5']", "eval_prompts=['0.5']", "iterations=2",
        "lora.enabled=false", f"run.output_dir={tmp_path}", "optim.lr=0.05", "rollout.num_steps=6",
        "run.log_with=none", "prompts_per_iteration=1", "run.progress=false", "eval.per_prompt=2", *extra])
    return module, config


def trained_rows(out):
    return [m for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m]


# --- Flow-GRPO: training-time CFG gradient ----------------------------------------------------------


@pytest.mark.parametrize("guidance", [4.5, 2.0])
def test_cfg_grad_cond_only_is_g_times_the_conditional_gradient(guidance):
    """Guided output u + g (c - u) of one shared weight (the analytic model's gain): "full" gives
    (1 - g) du + g dc, "cond_only" (the reference) g dc, i.e. 1/g of it is the conditional branch's
    own gradient; the value is identical."""
    adapter = GaussianAdapter()
    x = torch.randn(3, *adapter.shape, generator=torch.Generator().manual_seed(0))
    guided = adapter.encode(["1.0"] * 3, guidance_scale=guidance)
    plain_c = adapter.encode(["1.0"] * 3, guidance_scale=1.0)
    plain_u = adapter.encode(["0.0"] * 3, guidance_scale=1.0)  # the negative branch has mu = 0

    def grad(cond, **kw):
        adapter.denoiser.gain.grad = None
        out = adapter.predict(x, 600.0, cond, **kw)
        out.sum().backward()
        return float(adapter.denoiser.gain.grad), out.detach()

    du, _ = grad(plain_u)
    dc, _ = grad(plain_c)
    full, value_full = grad(guided, cfg_grad="full")
    cond_only, value_cond = grad(guided, cfg_grad="cond_only")
    assert torch.equal(value_full, value_cond)
    assert math.isclose(full, (1 - guidance) * du + guidance * dc, rel_tol=1e-5)
    assert math.isclose(cond_only, guidance * dc, rel_tol=1e-5)
    assert math.isclose(dc / cond_only, 1 / guidance, rel_tol=1e-5)


# --- Flow-GRPO: the KL term ---------------------------------------------------------------------------


def test_flow_grpo_kl_is_the_reference_formula_and_exact_over_it_is_one_over_minus_dt():
    """With the Flow-GRPO kernel's step std = std_t sqrt(-dt): the reference's KL
    ||mu - mu_ref||^2 / (2 std_t^2), std_t = a sqrt(sigma / (1 - sigma)), and the exact KL / it = 1 / (-dt)."""
    gen = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    sigma, sigma_next, a = 0.8, 0.7, 0.7
    new = flow_grpo_sde_step(x, v, sigma, sigma_next, noise=torch.zeros_like(x), noise_level=a)
    ref = flow_grpo_sde_step(x, v_ref, sigma, sigma_next, noise=torch.zeros_like(x), noise_level=a)
    std_t = float(flow_grpo_std(torch.tensor(sigma), torch.tensor(sigma_next), a))
    reference = ((new.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_t**2)
    ours = flow_grpo_kl(new.mean, ref.mean, new.std, sigma_next - sigma)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    exact = mean_kl(new.mean, ref.mean, new.std)
    torch.testing.assert_close(exact / ours, torch.full((2,), 1 / (sigma - sigma_next)), rtol=1e-5, atol=0)


def test_kl_form_in_a_trainer_run(tmp_path):
    """One trained step (an SDE window at step 2): the KL logged at iteration 2 (the weights are the
    same in both runs: the KL has no gradient at the reference) is exact = flow_grpo / (-dt_2)."""
    kl = {}
    for form in ("flow_grpo", "exact"):
        module, config = configured("flow_grpo", tmp_path / form, "group_size=8", "kl_beta=1.0",
                                    "rollout.sde_steps=[2]", f"kl_form={form}")
        adapter = GaussianAdapter(shape=(3, 4, 4))
        module.train(config, adapter=adapter)
        kl[form] = trained_rows(tmp_path / form)[1]["train/kl"]
    levels = adapter.schedule(6).levels
    assert kl["flow_grpo"] > 0
    assert math.isclose(kl["exact"] / kl["flow_grpo"], 1 / float(levels[2] - levels[3]), rel_tol=1e-4)


def test_flow_trainers_default_to_the_reference_conventions():
    for name in ("flow_grpo", "branch_grpo", "dense_grpo", "tempflow_grpo"):
        config = trainer_module(name).CONFIG()
        assert (config.kl_form, config.cfg_grad) == ("flow_grpo", "cond_only"), name
    assert trainer_module("ddpo").CONFIG().cfg_grad == "full"
