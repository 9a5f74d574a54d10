"""Model set-up of a training run: load the model (or take the one given), LoRA or full
fine-tuning, precision of the trained weights, gradient checkpointing, torch.compile and sharding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.errors import ConfigError


@dataclass
class LoraSettings:
    #: false: full fine-tuning of the denoiser (the reference is then a frozen copy)
    enabled: bool = True
    #: LoRA rank r of each adapted layer (32: the Flow-GRPO reference on SD3.5-M)
    rank: int = 32
    #: LoRA alpha: the low-rank update is scaled by alpha / rank (64: the Flow-GRPO reference, a scale of 2)
    alpha: float = 64.0
    #: module names to adapt (null: the adapter's attention projections)
    target_modules: list[str] | None = None


#: full fine-tuning of one expert on sharded weights: the frozen expert is shared by the live model
#: and the reference copy, and its weights are shards whenever the live root is not running
SHARDED_EXPERT_ERROR = ("model.train_experts: full fine-tuning of one expert (lora.enabled=false) is not supported "
                        "on sharded weights (run.fully_shard, FSDP): the reference shares the frozen expert's shards; "
                        "train a LoRA, or both experts")


def setup_model(run, model, lora: LoraSettings, adapter=None) -> bool:
    """``run.adapter``: the configured model (``adapter``: one given, which takes the configured size
    as its default) on the run's device, its trained parameters set up (:func:`setup_parameters`),
    compiled (``run.compile``) and sharded (``run.fully_shard`` over several processes, unless
    accelerate's FSDP plugin shards it in prepare). Returns whether it was sharded here."""
    from accelerate.utils import DistributedType

    from align.models import load_model

    if adapter is None:
        adapter = load_model(model)  # sets the configured size as the adapter's default
    else:  # the configured size is the adapter's default (FLUX reads its packed latents' grid from it)
        adapter.default_height = model.height or adapter.default_height
        adapter.default_width = model.width or adapter.default_width
    run.adapter = adapter
    adapter.denoiser.to(run.accelerator.device)
    setup_parameters(run, lora)
    if run.run_config.compile:
        from align.compile import compile_denoiser

        compile_denoiser(adapter, **run.run_config.compile_options)
    shard_here = (run.run_config.fully_shard and run.accelerator.num_processes > 1
                  and run.accelerator.distributed_type != DistributedType.FSDP)
    if shard_here:
        from align.sharding import shard_denoiser
        from align.training.trackers import log_text

        log_text(run, f"fully_shard: {shard_denoiser(adapter)} modules sharded over "
                      f"{run.accelerator.num_processes} processes (FSDP2)")
    return shard_here


def attach_lora(adapter, lora: LoraSettings) -> None:
    """The denoiser frozen and a LoRA (peft) attached to it, its weights in fp32: the trained
    parameters of a LoRA run (and of an asynchronous rollout worker's copy of the model)."""
    base = adapter.base_denoiser
    base.requires_grad_(False)
    try:
        adapter.add_lora(lora.rank, lora.alpha, lora.target_modules)
    except ValueError as err:  # peft: no module matches a target name
        layers = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                         if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                         and not name.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(f"lora.target_modules {lora.target_modules}: {str(err).splitlines()[0]} "
                          f"(layer names in this model: {', '.join(layers[:20])})") from None
    for param in base.parameters():  # peft leaves only LoRA weights trainable
        if param.requires_grad:
            param.data = param.data.float()


def setup_parameters(run, lora: LoraSettings) -> None:
    """LoRA (peft, fp32 adapter weights) or full fine-tuning (a frozen reference copy first), the
    trained experts and low-noise CFG scale of Wan 2.2 A14B, DDP's unused-parameter mode when a call
    may skip trained modules, and gradient checkpointing."""
    base = run.adapter.base_denoiser
    experts = getattr(getattr(run.config, "model", None), "train_experts", "both")
    if experts != "both":  # an adapter passed in takes the config's choice of experts
        if not hasattr(run.adapter, "train_experts"):
            raise ConfigError(f"model.train_experts: the {run.adapter.name!r} model has one denoiser; "
                              f"train_experts applies to Wan 2.2 A14B (wan22)")
        try:
            run.adapter.train_experts = experts
        except ValueError as err:
            raise ConfigError(f"model.train_experts: {err}") from None
    scale_2 = getattr(getattr(run.config, "model", None), "guidance_scale_2", None)
    if scale_2 is not None:  # an adapter passed in takes the config's low-noise CFG scale too
        run.adapter.guidance_scale_2 = scale_2
    if lora.enabled:
        attach_lora(run.adapter, lora)
    else:
        run.adapter.keep_reference_copy()
        base.requires_grad_(False)
        for module in run.adapter.fine_tune_modules():  # the whole denoiser, or the chosen experts
            module.requires_grad_(True)
    if run.adapter.forward_may_skip_trainables() and run.accelerator.num_processes > 1:
        # one call runs one expert: DDP must not wait for the gradients of the others
        from accelerate.utils import DistributedDataParallelKwargs

        handler = run.accelerator.ddp_handler or DistributedDataParallelKwargs()
        handler.find_unused_parameters = True
        run.accelerator.ddp_handler = handler
    if run.run_config.gradient_checkpointing:
        if not getattr(base, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"run.gradient_checkpointing: {type(base).__name__} does not support it")
        base.enable_gradient_checkpointing()
