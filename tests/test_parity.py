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
from align.trainers import ppo, trainer_module
from tests.conftest import GaussianAdapter
from tests.conftest import gaussian_trainer as configured


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
        module, config = configured("flow_grpo", tmp_path / form, "group_size=8", "ppo.kl_beta=1.0",
                                    "rollout.sde_steps=[2]", f"ppo.kl_form={form}")
        adapter = GaussianAdapter(shape=(3, 4, 4))
        module.train(config, adapter=adapter)
        kl[form] = trained_rows(tmp_path / form)[1]["train/kl"]
    levels = adapter.schedule(6).levels
    assert kl["flow_grpo"] > 0
    assert math.isclose(kl["exact"] / kl["flow_grpo"], 1 / float(levels[2] - levels[3]), rel_tol=1e-4)


def test_flow_trainers_default_to_the_reference_conventions():
    for name in ("flow_grpo", "branch_grpo", "dense_grpo", "tempflow_grpo"):
        config = trainer_module(name).CONFIG()
        assert (config.ppo.kl_form, config.ppo.cfg_grad) == ("flow_grpo", "cond_only"), name
    assert trainer_module("ddpo").CONFIG().ppo.cfg_grad == "full"


# --- Flow-GRPO: LoRA targets, EMA, sequence length ------------------------------------------------


def test_sd3_default_lora_targets_are_the_references_modules(tmp_path):
    """On a dual-attention SD3 (SD3.5-Medium's layout), the default LoRA adapts exactly the joint
    attention projections attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out},
    never attn2; the last block (context_pre_only) has no to_add_out."""
    from pipelines.sd3 import SD3Adapter
    from tests.tiny_models import build_sd3

    adapter = SD3Adapter.from_pretrained(str(build_sd3(tmp_path / "sd3", dual_attention_layers=(0,))))
    assert any(".attn2." in n for n, _ in adapter.denoiser.named_modules())
    adapter.add_lora(rank=2, alpha=4)
    adapted = sorted({n.split(".lora_A")[0] for n, _ in adapter.denoiser.named_parameters() if "lora_A" in n})
    suffixes = {n.split(".attn.", 1)[1] for n in adapted}
    assert all(".attn." in n and ".attn2." not in n for n in adapted), adapted
    assert suffixes == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


def test_ema_every_n_updates_and_the_exported_lora_is_the_ema(tmp_path):
    """optim.ema_every=2 over 4 updates steps the EMA twice; the exported LoRA holds the EMA weights
    (what the evaluation measured), not the raw ones of the last checkpoint."""
    from safetensors.torch import load_file

    from pipelines.toy import TOY_WEIGHTS_DIR

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    module = trainer_module("flow_grpo")
    out = tmp_path / "run"
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "rewards=[digit]", "iterations=4", "prompts_per_iteration=1", "group_size=4",
        "rollout.num_steps=3", "rollout.guidance_scale=1.0", "lora.rank=2", "lora.alpha=4", "optim.lr=0.01",
        "optim.ema_decay=0.5", "optim.ema_every=2", "eval.per_prompt=1", "eval_prompts=['a red digit 3']",
        f"run.output_dir={out}", "run.log_with=none", "run.progress=false", "run.checkpoint_every=4", "ppo.kl_beta=0"])
    module.train(config)
    checkpoint = out / "checkpoints" / "iteration-000004"
    from align.training.checkpoint_files import read_part

    ema = read_part(checkpoint, "ema")
    assert ema["optimization_step"] == 2
    raw = read_part(checkpoint, "trainable")
    exported = load_file(out / "lora" / "lora.safetensors")
    raw_b = [v for k, v in sorted(raw.items()) if "lora_B" in k]
    exported_b = [v for k, v in sorted(exported.items()) if "lora_B" in k]
    assert len(raw_b) == len(exported_b) == len(ema["shadow_params"]) // 2
    assert any(not torch.equal(a, b) for a, b in zip(raw_b, exported_b))
    assert all(any(torch.equal(e, s) for s in ema["shadow_params"] if s.shape == e.shape) for e in exported_b)


# --- Flow-GRPO / DanceGRPO: which steps timestep_fraction trains ---------------------------------


def steps_trained_per_row(monkeypatch, tmp_path, selection):
    module = trainer_module("flow_grpo")
    seen: dict[int, set[int]] = {}
    original = ppo.ppo_transition_loss

    def spy(run_, part, *args, **kwargs):
        for row in part.rows.tolist():
            seen.setdefault(row, set()).add(part.step)
        return original(run_, part, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_transition_loss", spy)
    _, config = configured("flow_grpo", tmp_path, "group_size=8", "ppo.kl_beta=0", "iterations=1",
                           "rollout.num_steps=11", "ppo.timestep_fraction=0.6", f"ppo.timestep_selection={selection}")
    module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
    monkeypatch.setattr(ppo, "ppo_transition_loss", original)
    return seen


def test_timestep_selection_modes(monkeypatch, tmp_path):
    """10 trainable steps, fraction 0.6: "shared" trains one random set of 6 for every row,
    "per_sample" (DanceGRPO) int(0.6 * 10) = 6 per row from each row's own permutation, "prefix"
    (the Flow-GRPO reference's order) steps 0..5."""
    shared = steps_trained_per_row(monkeypatch, tmp_path / "shared", "shared")
    per_sample = steps_trained_per_row(monkeypatch, tmp_path / "per_sample", "per_sample")
    prefix = steps_trained_per_row(monkeypatch, tmp_path / "prefix", "prefix")
    assert len(shared) == len(per_sample) == len(prefix) == 8
    assert len({frozenset(s) for s in shared.values()}) == 1 and all(len(s) == 6 for s in shared.values())
    assert all(len(s) == 6 and max(s) < 10 for s in per_sample.values())
    assert len({frozenset(s) for s in per_sample.values()}) > 1
    assert all(s == set(range(6)) for s in prefix.values())


# --- DiffusionNFT ----------------------------------------------------------------------------------


def test_nft_adaptive_loss_is_the_references_x0_space_form_with_its_constant():
    """With x0_hat = x_t - t v (x_t = (1 - t) x0 + t eps), the reference's
    (adv_clip / beta) [r mean((x0_hat+ - x0)^2) / sg(mean|x0_hat+ - x0|) + (1 - r) (same for -)]
    equals adaptive_nft_loss with scale adv_clip / beta, the trainer's default."""
    from align.losses import flow_matching_target
    from align.trainers.diffusion_nft import DiffusionNFTConfig, adaptive_nft_loss

    gen = torch.Generator().manual_seed(0)
    x0, eps, v_old, v_theta = (torch.randn(4, 3, 4, 4, generator=gen) for _ in range(4))
    t, r, beta, adv_clip = torch.tensor([0.9, 0.6, 0.3, 0.1]), torch.tensor([0.0, 0.3, 0.5, 1.0]), 0.1, 5.0
    x_t, target = flow_matching_target(x0, eps, t)
    tt = t.reshape(-1, 1, 1, 1)

    def term(v):
        err = (x_t - tt * v) - x0  # x0_hat - x0
        return (err**2).mean(dim=(1, 2, 3)) / err.abs().mean(dim=(1, 2, 3))

    v_pos, v_neg = (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta
    reference = adv_clip / beta * (r * term(v_pos) + (1 - r) * term(v_neg)).mean()
    ours = adaptive_nft_loss(v_theta, v_old, target, r, beta, t, scale=adv_clip / beta)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    config = DiffusionNFTConfig()
    assert (config.loss_weighting, config.kl_beta, config.t_distribution) == ("adaptive", 1e-4, "schedule_permutation")


def test_nft_trains_each_sample_at_the_samplers_levels_in_its_own_order():
    """schedule_permutation: every sample gets t_per_sample distinct levels of the sampler (default:
    9 of 10), in an order of its own."""
    from align.trainers.diffusion_nft import DiffusionNFTConfig, draw_t, draws_per_sample

    config = DiffusionNFTConfig()
    levels = torch.linspace(1, 0, 11)  # 10 steps: levels 1.0 ... 0.1, then the clean 0
    k = draws_per_sample(config)
    assert k == 9
    t = draw_t(config, 6 * k, torch.Generator().manual_seed(0), levels, per_sample=k).reshape(6, k)
    allowed = set(levels[:-1].tolist())
    for row in t:
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= allowed
    assert len({tuple(row.tolist()) for row in t}) == 6  # each sample its own order


def test_nft_policy_decay_counts_optimizer_updates_and_offers_the_flat_warmup():
    from align.trainers.diffusion_nft import DiffusionNFTConfig, policy_decay

    linear = DiffusionNFTConfig(policy_ema_decay=0.5, policy_ema_rate=0.001)
    assert [policy_decay(linear, u) for u in (1, 100, 500, 5000)] == pytest.approx([0.001, 0.1, 0.5, 0.5])
    ocr = DiffusionNFTConfig(policy_ema_schedule="flat_warmup", policy_ema_rate=0.0075, policy_ema_decay=0.999,
                             policy_ema_warmup=75)
    assert [policy_decay(ocr, u) for u in (1, 75, 76, 100, 300)] == pytest.approx([0, 0, 0.0075, 0.1875, 0.999])


# --- BranchGRPO ------------------------------------------------------------------------------------


def small_tree(adapter, **rollout_options):
    from align.sampling.rollout import RolloutConfig, rollout

    cond = adapter.encode(["1.0"])
    config = RolloutConfig(num_steps=4, split_steps=[0, 2], branch_factor=2, **rollout_options)
    return rollout(adapter, cond, config, generator=torch.Generator().manual_seed(0)), cond


def test_split_noise_injected_widens_the_draw_but_keeps_the_unscaled_density():
    """split_noise "injected" (the reference): at a split the children spread split_noise_scale x
    the kernel's std around its mean, while the recorded std and log-prob are the unscaled kernel's
    (re-scoring reproduces them); "density" records the scaled std."""
    from align.sampling.rescore import rescore

    adapter = GaussianAdapter(shape=(1, 32, 32))
    plain, _ = small_tree(adapter)
    injected, cond = small_tree(adapter, split_noise_scale=4.0, split_noise="injected")
    density, _ = small_tree(adapter, split_noise_scale=4.0, split_noise="density")
    p0, i0, d0 = (r.main_transitions([0])[0] for r in (plain, injected, density))
    torch.testing.assert_close(i0.std, p0.std)
    torch.testing.assert_close(d0.std, 4 * p0.std)
    spread = ((i0.next_latents - i0.mean).flatten(1).std(1) / i0.std).mean()
    assert abs(float(spread) - 4.0) < 0.1
    assert torch.equal(rescore(adapter, i0, cond, injected.schedule).log_prob, i0.log_prob)


def test_final_x0_hat_is_the_last_steps_clean_estimate():
    """Leaves decoded from x0_hat (the reference): on an ODE rollout the last Euler step to sigma = 0
    lands exactly on x - sigma v = x0_hat; on an SDE rollout x0_hat leaves out the last step's noise."""
    from align.sampling.rollout import RolloutConfig, rollout

    adapter = GaussianAdapter()
    cond = adapter.encode(["1.0"])
    ode = rollout(adapter, cond, RolloutConfig(num_steps=4, kernel="ode"), group_size=3,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ode.final_x0_hat, ode.samples, rtol=0, atol=1e-6)
    sde = rollout(adapter, cond, RolloutConfig(num_steps=4), group_size=3, generator=torch.Generator().manual_seed(0))
    last = sde.main_transitions([3])[0]
    assert not torch.allclose(sde.final_x0_hat, sde.samples)
    with torch.no_grad():
        v = adapter.predict(last.latents, sde.schedule.timesteps[3], cond.select(last.prompt_index))
    torch.testing.assert_close(sde.final_x0_hat, last.latents - sde.schedule.levels[3] * v)
    assert trainer_module("branch_grpo").CONFIG().leaf_sample == "x0_hat"


def test_depth_normalisation_unbiased_std_and_eps():
    from align.advantages import group_advantages

    r, groups = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.long)
    unbiased, _ = group_advantages(r, groups, eps=0.0, unbiased=True, clip=None)
    population, _ = group_advantages(r, groups, eps=0.0, clip=None)
    torch.testing.assert_close(unbiased, torch.tensor([-1.0, 0.0, 1.0]))  # std with n - 1 = 1
    torch.testing.assert_close(population / unbiased.masked_fill(unbiased == 0, 1), torch.tensor(
        [math.sqrt(3 / 2), 0.0, math.sqrt(3 / 2)]))
    config = trainer_module("branch_grpo").CONFIG()
    assert (config.adv_unbiased, config.adv_eps) == (True, 1e-8)


def test_edge_fusion_is_a_recursive_softmax_over_one_step_log_probs():
    """Splits at steps 0 and 2 (4 leaves): a child node of the first split is worth
    softmax(lp_leafedges) . leaf rewards, the root softmax(lp_child edges) . those; a huge temperature
    gives the plain mean."""
    from align.trees import edge_fused_rewards

    tree, _ = small_tree(GaussianAdapter())
    rewards = torch.tensor([0.1, 0.7, 0.4, 0.9])
    values = edge_fused_rewards(tree, rewards)
    lp0, lp2 = tree.main_transitions([0])[0].log_prob, tree.main_transitions([2])[0].log_prob
    child = torch.stack([torch.softmax(lp2[2 * k:2 * k + 2], 0) @ rewards[2 * k:2 * k + 2] for k in range(2)])
    torch.testing.assert_close(values[1], child)  # the two nodes after step 1 (before the split at 2)
    torch.testing.assert_close(values[-1], (torch.softmax(lp0, 0) @ child).reshape(1))
    flat = edge_fused_rewards(tree, rewards, temperature=1e9)
    torch.testing.assert_close(flat[-1], rewards.mean().reshape(1))


def test_edges_per_update_steps_the_optimizer_every_n_edges(tmp_path):
    module, config = configured("branch_grpo", tmp_path, "group_size=0", "rollout.split_steps=[0,2]",
                                "trees_per_prompt=2", "edges_per_update=5", "iterations=1", "ppo.clip_range=0.2")
    module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
    row = trained_rows(tmp_path)[0]
    assert row["tree/edges_trained"] > 5
    assert row["train/updates"] == math.ceil(row["tree/edges_trained"] / 5)
    assert row["train/on_policy_clip_fraction"] == 0.0  # the first update's edges are on-policy


# --- DPM-Solver++ (2M): the DiffusionNFT reference's sampler ----------------------------------------


def velocity_field(x, sigma):
    return torch.sin(3 * x) * (1 + sigma) - 0.5 * x  # any smooth field: the solvers must agree on it


def test_dpm_solver_matches_diffusers_multistep_scheduler():
    """dpm_solver_2m_step threaded with each step's previous x0 reproduces diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, order 2, flow sigmas, lower-order final step)."""
    from diffusers import DPMSolverMultistepScheduler

    from align.sampling.kernels import dpm_solver_2m_step

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                            algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.float()
    theirs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, prev_x0, prev_level = theirs.clone(), None, None
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity_field(theirs, sigmas[i]), t, theirs).prev_sample
        v = velocity_field(ours, sigmas[i])
        out = dpm_solver_2m_step(ours, v, sigmas[i], sigmas[i + 1], prev_x0=prev_x0, level_prev=prev_level)
        prev_x0, prev_level, ours = ours - sigmas[i] * v, sigmas[i], out.prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)
        assert torch.equal(out.log_prob, torch.zeros(2))


def test_dpm_solver_in_the_rollout_is_second_order_and_trainers_that_need_log_probs_reject_it():
    """As rollout.kernel the solver takes every step with each row's history (the rollout equals the
    kernel threaded by hand); on the analytic Gaussian flow (exact velocity) 6 DPM steps land more
    than twice as close to the 200-step Euler answer as 6 Euler steps; a GRPO trainer refuses a
    kernel without log-probs in one line."""
    from align.config import ConfigError
    from align.sampling.kernels import dpm_solver_2m_step
    from align.sampling.rollout import RolloutConfig, rollout

    adapter = GaussianAdapter()
    cond = adapter.encode(["1.0"])
    noise = adapter.initial_noise(8, torch.Generator().manual_seed(0))

    def run(kernel, steps):
        return rollout(adapter, cond, RolloutConfig(num_steps=steps, kernel=kernel), group_size=8,
                       initial_noise=noise).samples

    exact = run("ode", 200)
    dpm, euler = run("dpm_solver", 6), run("ode", 6)
    schedule, x, prev_x0, prev_level = adapter.schedule(6), noise.clone(), None, None
    rows = cond.select(torch.zeros(8, dtype=torch.long))
    for i in range(6):
        v = adapter.predict(x, schedule.timesteps[i], rows)
        out = dpm_solver_2m_step(x, v, schedule.levels[i], schedule.levels[i + 1], prev_x0=prev_x0,
                                 level_prev=prev_level)
        prev_x0, prev_level, x = x - schedule.levels[i] * v, schedule.levels[i], out.prev_sample
    torch.testing.assert_close(dpm, x, rtol=0, atol=1e-6)
    assert (dpm - exact).abs().max() < (euler - exact).abs().max() / 2
    module, config = configured("flow_grpo", "unused", "rollout.kernel=dpm_solver")
    with pytest.raises(ConfigError, match="rollout.kernel: 'dpm_solver' is deterministic"):
        module.check_config(config)


def test_model_max_sequence_length_reaches_the_t5_encoder(tmp_path):
    """model.max_sequence_length (the reference trains SD3.5 with 128 T5 tokens): the prompt
    embedding is 77 CLIP tokens plus that many T5 tokens; a model without T5 rejects the key."""
    from align.config import ConfigError
    from align.models import ModelConfig, load_model
    from tests.tiny_models import build_sd3

    path = str(build_sd3(tmp_path / "sd3", with_t5=True))
    lengths = {}
    for tokens in (8, 12):
        adapter = load_model(ModelConfig(name="sd3", path=path, device="cpu", dtype="float32",
                                         max_sequence_length=tokens))
        lengths[tokens] = adapter.encode(["a red car"], guidance_scale=1.0).tensors["prompt_embeds"].shape[1]
    assert lengths[12] - lengths[8] == 4
    with pytest.raises(ConfigError, match="model.max_sequence_length"):
        load_model(ModelConfig(name="toy", max_sequence_length=8))


def test_updates_per_epoch_makes_that_many_updates_and_the_first_is_on_policy(tmp_path):
    """updates_per_epoch=2 (the reference's) with 2 inner epochs: 4 updates an iteration; before the
    first one every transition re-scores exactly; later minibatches are off-policy (ratios move)."""
    module, config = configured("flow_grpo", tmp_path, "group_size=8", "ppo.kl_beta=0", "iterations=1",
                                "updates_per_epoch=2", "ppo.inner_epochs=2", "ppo.clip_range=1e-6")
    module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
    row = trained_rows(tmp_path)[0]
    assert row["train/updates"] == 4
    assert row["train/on_policy_approx_kl"] == 0.0 and row["train/on_policy_clip_fraction"] == 0.0
    assert row["train/clip_fraction"] > 0  # the clip acts once the policy has moved


def test_edge_minibatches_let_the_clip_act(tmp_path):
    """With the reference's edge minibatches the later updates see moved ratios: at a tight clip a
    part of them is clipped (one update an iteration never clips)."""
    rows = {}
    for label, extra in (("edges", ["edges_per_update=4"]), ("one", [])):
        module, config = configured("branch_grpo", tmp_path / label, "group_size=0", "rollout.split_steps=[0,2]",
                                    "trees_per_prompt=2", "iterations=1", "ppo.clip_range=1e-6", *extra)
        module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
        rows[label] = trained_rows(tmp_path / label)[0]
    assert rows["edges"]["train/clip_fraction"] > 0 and rows["one"]["train/clip_fraction"] == 0.0
