"""The fused Triton SDE step against the torch reference kernels. On a machine without CUDA the
kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here when unset), so
``TRITON_INTERPRET=1 pytest -k triton`` and the default suite both check it on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from align.sampling.kernels import KERNELS  # noqa: E402
from align.sampling.triton_step import FUSED_KERNELS, can_fuse, fused_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: image latents, a video latent (B, C, F, H, W), odd sizes over several blocks
SHAPES = [((3, 4, 8, 8), torch.float32), ((2, 16, 3, 5, 7), torch.bfloat16), ((5, 3, 33, 31), torch.float32),
          ((4, 4, 8, 8), torch.float16)]


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    sigma = (torch.rand(shape[0], generator=g) * 0.8 + 0.15).to(DEVICE)  # a sigma per row
    return x, v, sigma, sigma - 0.05 * torch.rand(shape[0], generator=g).to(DEVICE) - 0.01


def close(a, b, scale=1.0):
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("shape, dtype", SHAPES, ids=[f"{tuple(s)}-{str(d)[6:]}" for s, d in SHAPES])
def test_triton_step_matches_the_reference_kernel(kernel, shape, dtype):
    x, v, sigma, sigma_next = inputs(shape, dtype)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g).to(DEVICE)
    shift = 0.1 * torch.randn(shape, generator=g).to(DEVICE)  # a guided drift moves the sample only
    params = KERNELS[kernel].defaults
    ref = KERNELS[kernel].fn(x, v, sigma, sigma_next, noise=noise, mean_shift=shift, **params)
    out = fused_step(kernel, x, v, sigma, sigma_next, noise=noise, mean_shift=shift, **params)
    assert out.prev_sample.dtype == torch.float32 and out.prev_sample.shape == x.shape
    assert close(out.prev_sample, ref.prev_sample) and close(out.mean, ref.mean)
    assert close(out.std, ref.std) and close(out.log_prob, ref.log_prob)


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_triton_rescoring_a_given_sample_matches_the_reference(kernel, reduce):
    x, v, sigma, sigma_next = inputs((3, 4, 9, 11), torch.float32, seed=2)
    params = KERNELS[kernel].defaults
    sample = KERNELS[kernel].fn(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(0),
                                **params).prev_sample
    ref = KERNELS[kernel].fn(x, v, sigma, sigma_next, prev_sample=sample, reduce=reduce, **params)
    out = fused_step(kernel, x, v, sigma, sigma_next, prev_sample=sample, reduce=reduce, **params)
    assert torch.equal(out.prev_sample, sample)
    assert close(out.log_prob, ref.log_prob, scale=ref.log_prob.abs().max().item())


def test_triton_step_draws_the_reference_noise_from_a_generator():
    x, v, sigma, sigma_next = inputs((2, 4, 8, 8), torch.float32)
    ref = KERNELS["flow_grpo"].fn(x, v, 0.6, 0.5, generator=torch.Generator().manual_seed(7), noise_level=0.7)
    out = fused_step("flow_grpo", x, v, 0.6, 0.5, generator=torch.Generator().manual_seed(7), noise_level=0.7)
    assert close(out.prev_sample, ref.prev_sample) and close(out.log_prob, ref.log_prob)


def test_triton_step_is_never_taken_for_a_step_that_keeps_its_gradient():
    x = torch.zeros(2, 4, device=DEVICE)
    with torch.no_grad():
        assert can_fuse("flow_grpo", x, "on") and not can_fuse("flow_grpo", x, "off")
        assert not can_fuse("ddim", x, "on") and not can_fuse("ode", x, "on")
    assert not can_fuse("flow_grpo", x, "on")  # gradients enabled: the reference kernel


def test_triton_rollout_equals_the_torch_rollout_and_the_first_ratio_is_one(monkeypatch):
    import align.sampling.triton_step as triton_step
    from align.sampling.rescore import rescore
    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.toy import load_toy_adapter

    calls = []
    monkeypatch.setattr(triton_step, "fused_step", lambda *a, **k: calls.append(1) or fused_step(*a, **k))

    adapter = load_toy_adapter()
    cond = adapter.encode(["a red digit 3", "a blue digit 8"], "", 1.0)
    results = {}
    for mode in ("off", "on"):
        config = RolloutConfig(num_steps=6, kernel="flow_grpo", guidance_scale=1.0, fused_step=mode,
                               split_steps=[1])
        with torch.no_grad():
            results[mode] = rollout(adapter, cond, config, group_size=2, generator=torch.Generator().manual_seed(0))
    fused, torch_run = results["on"], results["off"]
    assert len(calls) == 6  # every step of the fused run took the fused kernel
    assert close(fused.samples, torch_run.samples)
    for a, b in zip(fused.transitions, torch_run.transitions):
        assert close(a.log_prob, b.log_prob) and close(a.next_latents, b.next_latents)
    schedule = adapter.schedule(6, latent_shape=adapter.latent_shape())
    with torch.no_grad():  # the old log-probs of a training step: the same fused kernel, so ratio 1 exactly
        again = rescore(adapter, fused.transitions[2], cond, schedule, config)
    assert torch.equal(torch.exp(again.log_prob - fused.transitions[2].log_prob),
                       torch.ones_like(again.log_prob))
