"""The precision policy: the denoiser in bf16 / fp16 (``model.dtype``) with step kernels and
log-probs in fp32, the VAE in fp32 when asked (``model.vae_dtype``), text encoders offloaded to
the CPU (``model.offload_text_encoders``)."""

from __future__ import annotations

import pytest
import torch

from align.errors import ConfigError
from align.models import ModelConfig, load_model
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig, rollout

PROMPTS = ["a red digit 3", "a blue digit 8"]
#: largest |log-prob difference| (per-element mean log-prob, whose size here is ~0.7) of re-scoring
#: fp32 transitions with the half-precision model; measured below 0.007 (bf16) and 0.0015 (fp16)
TOLERANCE = {"bfloat16": 0.02, "float16": 0.005}


@pytest.mark.parametrize("kernel", ["flow_grpo", "dance_grpo"])
@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_half_precision_log_probs_match_fp32_to_a_stated_tolerance_up_to_the_last_step(kernel, dtype):
    config = RolloutConfig(num_steps=10, kernel=kernel)
    reference = load_model(ModelConfig(name="toy", dtype="float32", device="cpu"))
    with torch.no_grad():
        result = rollout(reference, reference.encode(PROMPTS, "", 3.0), config, group_size=2,
                         generator=torch.Generator().manual_seed(0))
        half = load_model(ModelConfig(name="toy", dtype=dtype, device="cpu"))
        assert next(half.denoiser.parameters()).dtype == getattr(torch, dtype)
        cond = half.encode(PROMPTS, "", 3.0)
        again = [rescore(half, t, cond, result.schedule, config) for t in result.transitions]
    for transition, out in zip(result.transitions, again):
        assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()  # the sharp last steps too
        assert (out.log_prob - transition.log_prob).abs().max() < TOLERANCE[dtype], transition.step
    assert max(float((o.log_prob - t.log_prob).abs().max()) for o, t in zip(again, result.transitions)) > 0


def test_the_vae_can_stay_fp32_under_a_bf16_denoiser(tmp_path):
    from tiny_models import build_sd3

    path = str(build_sd3(tmp_path / "sd3"))
    adapter = load_model(ModelConfig(name="sd3", path=path, device="cpu", dtype="bfloat16", vae_dtype="float32"))
    assert next(adapter.denoiser.parameters()).dtype == torch.bfloat16
    assert next(adapter.vae.parameters()).dtype == torch.float32
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = load_model(ModelConfig(name="sd3", path=path, device="cpu", dtype="float32")).decode(latents)
        assert torch.allclose(adapter.decode(latents.bfloat16()), fp32, atol=1e-2)
    with pytest.raises(ConfigError, match="model.vae_dtype: the 'toy' model has no VAE"):
        load_model(ModelConfig(name="toy", vae_dtype="float32"))


def test_offloaded_text_encoders_encode_the_same_prompts(tmp_path):
    from tiny_models import build_sd3

    path = str(build_sd3(tmp_path / "sd3"))
    plain = load_model(ModelConfig(name="sd3", path=path, device="cpu", dtype="float32"))
    offloaded = load_model(ModelConfig(name="sd3", path=path, device="cpu", dtype="float32", offload_text_encoders=True))
    assert hasattr(offloaded.pipe.text_encoder, "_hf_hook")  # accelerate's offload hook moves it per call
    a, b = plain.encode(["a cat"], "", 2.0), offloaded.encode(["a cat"], "", 2.0)
    for key in a.tensors:
        assert torch.allclose(a.tensors[key], b.tensors[key], atol=1e-6)
