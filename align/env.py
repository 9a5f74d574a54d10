"""What `align env` reports: versions, devices and attention backends."""

from __future__ import annotations

import importlib
import platform

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return "not installed"


def attention_backends() -> dict[str, str]:
    """Which scaled-dot-product attention backends this torch build can use here."""
    cuda = torch.cuda.is_available()
    backends = {"sdpa (torch)": "yes" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "no"}
    if cuda:
        backends["sdpa flash"] = str(torch.backends.cuda.flash_sdp_enabled())
        backends["sdpa memory-efficient"] = str(torch.backends.cuda.mem_efficient_sdp_enabled())
        backends["sdpa cudnn"] = str(torch.backends.cuda.cudnn_sdp_enabled())
    else:
        backends["sdpa flash / memory-efficient"] = "needs a CUDA device"
    backends["xformers"] = _version("xformers")
    backends["triton"] = _version("triton")
    from align.attention import available_backends

    backends.update({f"model.attention_backend={name}": state for name, state in available_backends().items()})
    return backends


def environment_report() -> dict[str, str]:
    report = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip", "safetensors",
                   "omegaconf", "gradio"):
        report[module] = _version(module)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        report["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    else:
        report["device"] = f"cpu ({torch.get_num_threads()} threads)"
    report.update({f"attention: {k}": v for k, v in attention_backends().items()})
    return report
