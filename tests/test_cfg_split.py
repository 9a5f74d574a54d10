"""``rollout.cfg_split``: CFG's branches as two calls, the rollout's unconditional prediction kept
and reused by the re-scores before an update; ``reuse_rollout_graph``: the rollout's graphs train the
pass before the first update. On the embedded toy model (CFG 3) with a LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from align.config import ConfigError, load_config
from align.models import ModelConfig, load_model
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig, rollout
from align.trainers import trainer_module


@pytest.fixture(scope="module")
def toy():
    adapter = load_model(ModelConfig(name="toy", device="cpu"))
    adapter.add_lora(rank=4, alpha=8)
    torch.manual_seed(0)
    for name, p in adapter.denoiser.named_parameters():
        if "lora_B" in name:  # a LoRA away from zero, so the adapter matters
            p.data.normal_(0, 0.05)
    return adapter


def sample(adapter, cfg_split: bool):
    cond = adapter.encode(["3", "7"], "", 3.0)
    config = RolloutConfig(num_steps=4, kernel="flow_grpo", cfg_split=cfg_split)
    with torch.no_grad():
        return cond, config, rollout(adapter, cond, config, group_size=3, generator=torch.Generator().manual_seed(1))


def lora_grad(adapter, loss):
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_split_rollout_samples_what_the_joint_batch_samples(toy):
    _, _, joint = sample(toy, False)
    _, _, split = sample(toy, True)
    torch.testing.assert_close(split.samples, joint.samples, rtol=0, atol=1e-5)
    assert all(t.uncond is None for t in joint.transitions)
    assert all(t.uncond.shape == t.latents.shape for t in split.transitions)


def test_reused_uncond_rescores_exactly_and_needs_only_the_conditional_rows(toy):
    """The first on-policy ratio is exactly 1 with the kept unconditional prediction, and the re-score
    sends the 6 conditional rows through the network (12 without reuse, 12 for the joint batch)."""
    cond, config, result = sample(toy, True)
    for t in result.transitions:
        for reuse, rows in ((True, 6), (False, 12)):
            before = toy.transformer_rows
            new = rescore(toy, t, cond, result.schedule, config, cfg_grad="cond_only", reuse_uncond=reuse)
            assert toy.transformer_rows - before == rows
            assert torch.equal(new.log_prob, t.log_prob)
    # "full" never takes the kept prediction: it needs u's gradient
    before = toy.transformer_rows
    rescore(toy, result.transitions[0], cond, result.schedule, config, cfg_grad="full", reuse_uncond=True)
    assert toy.transformer_rows - before == 12


def test_split_cond_only_gradient_is_the_joint_batchs(toy):
    """The LoRA gradient of a cond_only re-score (g dc) is the same from the split calls with the
    kept u, from the split calls recomputing u, and from the joint [u; c] batch."""
    cond, config, result = sample(toy, True)
    t = result.transitions[1]
    joint = RolloutConfig(num_steps=4, kernel="flow_grpo", cfg_split=False)
    grads = [lora_grad(toy, rescore(toy, t, cond, result.schedule, c, cfg_grad="cond_only",
                                    reuse_uncond=reuse).log_prob.sum())
             for c, reuse in ((config, True), (config, False), (joint, False))]
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-7)
    # "full" differs: it adds (1 - g) du
    full = lora_grad(toy, rescore(toy, t, cond, result.schedule, config, cfg_grad="full").log_prob.sum())
    assert (full - grads[0]).abs().max() > 1e-3 * grads[0].abs().max()


def run_flow_grpo(tmp_path, cfg_split: bool, calls: list | None = None):
    """Two iterations of 2 inner epochs (one update each) over 3 trained steps; ``calls`` collects
    (cfg_grad, reuse_uncond) of every re-score."""
    import align.sampling.rescore as rescore_module

    original = rescore_module.rescore

    def spy(*args, **kwargs):
        if calls is not None:
            calls.append((kwargs.get("cfg_grad", "full"), kwargs.get("reuse_uncond", False)))
        return original(*args, **kwargs)

    rescore_module.rescore = spy
    try:
        return train_flow_grpo(tmp_path, cfg_split)
    finally:
        rescore_module.rescore = original


def train_flow_grpo(tmp_path, cfg_split: bool, *extra: str):
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "model.device=cpu", "rewards=[digit]", "heldout_rewards=[]", "prompts=['3', '7']",
        "eval_prompts=['3']", "eval.per_prompt=1", "eval.num_steps=2", "iterations=2", "prompts_per_iteration=2",
        "group_size=3", "rollout.num_steps=4", "ppo.kl_beta=0.04", "ppo.inner_epochs=2", "lora.rank=4",
        "run.log_with=none", "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp_path}",
        f"rollout.cfg_split={cfg_split}", *extra])
    module.train(config)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_flow_grpo_with_cfg_split_is_on_policy_exactly_and_trains_as_the_joint_batch(tmp_path):
    """Two inner epochs: the first pass reuses u, the second (after an update) recomputes it. The
    on-policy KL is exactly 0 and the losses and KLs are the joint batch's."""
    calls = []
    split = [m for m in run_flow_grpo(tmp_path / "split", True, calls) if "train/loss" in m]
    policy = [reuse for grad, reuse in calls if grad == "cond_only"]  # the KL reference's are "full"
    assert policy == ([True] * 3 + [False] * 3) * 2  # reused before each iteration's first update only
    assert not any(reuse for grad, reuse in calls if grad == "full")
    joint = [m for m in run_flow_grpo(tmp_path / "joint", False) if "train/loss" in m]
    assert len(split) == len(joint) == 2
    for a, b in zip(split, joint):
        assert a["train/on_policy_approx_kl"] == 0.0
        for key in ("train/loss", "train/kl", "train/grad_norm", "reward/score/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def test_cfg_split_with_a_full_cfg_gradient_is_refused():
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, ["model.name=toy", "ppo.cfg_grad=full"])
    with pytest.raises(ConfigError, match="rollout.cfg_split needs ppo.cfg_grad: cond_only"):
        module.check_config(config)


def test_reuse_rollout_graph_trains_as_the_re_score_without_its_policy_forwards(tmp_path, monkeypatch):
    """With the rollout's graphs, the 3 trained steps of each iteration's first pass call the model
    for the KL reference only: 6 model calls fewer over 2 iterations, and every logged loss, KL,
    gradient norm and reward equals the re-scoring run's (the second inner epoch, after an update,
    re-scores as usual)."""
    import align.sampling.rescore as rescore_module
    import align.sampling.rollout as rollout_module

    counts = {}
    original = rollout_module.predict_in_chunks

    def counting(*args, **kwargs):
        counts[label] = counts.get(label, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "predict_in_chunks", counting)  # rollouts
    monkeypatch.setattr(rescore_module, "predict_in_chunks", counting)  # re-scores
    label = "reuse"
    reused = [m for m in train_flow_grpo(tmp_path / "reuse", True, "reuse_rollout_graph=true") if "train/loss" in m]
    label = "rescore"
    plain = [m for m in train_flow_grpo(tmp_path / "rescore", True) if "train/loss" in m]
    assert counts["rescore"] - counts["reuse"] == 2 * 3
    assert len(reused) == len(plain) == 2
    for a, b in zip(reused, plain):
        assert a["train/on_policy_approx_kl"] == 0.0
        for key in ("train/loss", "train/kl", "train/grad_norm", "reward/score/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_a_rollout_keeping_its_graph_samples_the_same_and_its_gradient_is_the_re_scores(toy):
    """keep_policy_graph changes no sampled value, and the log-prob gradient through the kept graph is
    the re-score's (cond_only)."""
    cond = toy.encode(["3", "7"], "", 3.0)
    config = RolloutConfig(num_steps=3, kernel="flow_grpo", guidance_scale=3.0, cfg_split=True)
    with torch.no_grad():
        plain = rollout(toy, cond, config, group_size=2, generator=torch.Generator().manual_seed(0))
        kept = rollout(toy, cond, config, group_size=2, generator=torch.Generator().manual_seed(0),
                       keep_policy_graph=True, cfg_grad="cond_only")
    assert torch.equal(plain.samples, kept.samples)
    t_plain, t_kept = plain.transitions[1], kept.transitions[1]
    assert t_plain.policy_out is None and t_kept.policy_out.requires_grad
    assert torch.equal(t_plain.log_prob, t_kept.log_prob)
    from_graph = lora_grad(toy, rescore(toy, t_kept, cond, kept.schedule, config, cfg_grad="cond_only",
                                        reuse_uncond=True).log_prob.sum())
    fresh = lora_grad(toy, rescore(toy, t_plain, cond, plain.schedule, config, cfg_grad="cond_only",
                                   reuse_uncond=True).log_prob.sum())
    assert from_graph.abs().max() > 0
    torch.testing.assert_close(from_graph, fresh, rtol=1e-4, atol=1e-8)



def test_reuse_rollout_graph_with_chunked_rollouts_keeps_the_chunks_graphs(tmp_path):
    """run.rollout_chunks=2: the chunks' kept graphs are joined with their graphs, the first ratio
    is exactly 1 and the gradient is the re-scoring run's."""
    reused = [m for m in train_flow_grpo(tmp_path / "reuse", True, "reuse_rollout_graph=true", "run.rollout_chunks=2",
                                         "iterations=1", "ppo.inner_epochs=1") if "train/loss" in m]
    plain = [m for m in train_flow_grpo(tmp_path / "rescore", True, "run.rollout_chunks=2", "iterations=1",
                                        "ppo.inner_epochs=1") if "train/loss" in m]
    assert reused[0]["train/on_policy_approx_kl"] == 0.0
    assert reused[0]["train/grad_norm"] == pytest.approx(plain[0]["train/grad_norm"], rel=1e-5)
