"""``model.attention_backend`` routes a diffusers denoiser's attention through diffusers' dispatch:
another backend gives the same predictions as native SDPA, and names that cannot run are one line."""

from __future__ import annotations

import pytest
import torch

from align.errors import ConfigError


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_a_dispatched_backend_predicts_what_native_sdpa_predicts(tmp_path, model):
    """SD3's stock joint attention calls SDPA directly: the adapter routes it through the dispatch
    (its second self-attention of SD3.5-Medium's dual blocks included)."""
    from align.models import ModelConfig, load_model
    from tiny_models import build_flux, build_sd3

    path = str(build_flux(tmp_path / "flux") if model == "flux" else
               build_sd3(tmp_path / "sd3", dual_attention_layers=(0,)))
    outputs = {}
    for backend in ("native", "_native_math"):
        adapter = load_model(ModelConfig(name=model, path=path, device="cpu", dtype="float32",
                                         attention_backend=backend))
        processors = [m.processor for m in adapter.base_denoiser.modules() if hasattr(m, "processor")]
        assert processors and all(getattr(p, "_attention_backend", None) in (None if backend == "native" else backend,)
                                  for p in processors)
        cond = adapter.encode(["a cat"], "", 1.0)
        x = adapter.initial_noise(2, torch.Generator().manual_seed(0))
        schedule = adapter.schedule(4, latent_shape=tuple(x.shape[1:]))
        with torch.no_grad():
            outputs[backend] = adapter.predict(x, schedule.timesteps[1], cond.select(torch.tensor([0, 0])))
    assert torch.allclose(outputs["native"], outputs["_native_math"], atol=1e-5)


@pytest.mark.parametrize("name, message", [("flsh", "unknown attention backend 'flsh' (did you mean 'flash'"),
                                           ("_native_npu", "'_native_npu' cannot run here")])
def test_a_backend_that_cannot_run_is_one_line(name, message):
    from align.attention import check_attention_backend

    with pytest.raises(ConfigError, match="model.attention_backend") as err:
        check_attention_backend(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_align_env_lists_the_backends(capsys):
    from align.commands.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "model.attention_backend=native" in out and "model.attention_backend=xformers" in out


def test_a_denoiser_outside_the_dispatch_is_one_line(tmp_path):
    from align.models import ModelConfig, load_model
    from tiny_models import build_sd

    with pytest.raises(ConfigError, match="do not go through diffusers' dispatch"):
        load_model(ModelConfig(name="sd", path=str(build_sd(tmp_path / "sd")), device="cpu", dtype="float32",
                               attention_backend="_native_math"))
