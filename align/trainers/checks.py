"""The validation every trainer runs before anything loads (its ``check_config`` starts with
:func:`check_common`), and the checks of which sampling steps are left to train."""

from __future__ import annotations

from align.errors import ConfigError, unknown_name_error
from align.trainers.scoring import heldout_specs
from pipelines.registry import adapter_class

from align.trainers.config import TrainerConfig


def check_common(config: TrainerConfig, adapter=None) -> None:
    """The validation pass every trainer's check_config starts with, before anything loads: every
    name a user types (the trainer, the model adapter, the step kernel and its parameters, the
    trained and held-out rewards; tracker and precision are checked as the config is read), the
    numeric ranges of every field (align.config.check_ranges), non-empty prompt lists, a kernel of
    the model's family, an available device, and a run folder this run may use (align/training/run_folder.py:
    not another trainer's run, not a run of other settings, not a finished run). Each problem is a one-line ConfigError naming its field. ``adapter``: the model when the
    caller has it (its schedule, not ``model.name``, then tells the model family)."""
    from pipelines.registry import FLOW_ADAPTERS, check_adapter_name
    from rewards.registry import check_reward_specs

    from align.config import check_ranges
    from align.training.run_folder import check_run_folder
    from align.models import check_device, check_model_source, check_precision
    from align.sampling.kernels import kernel_spec
    from align.trainers import TRAINERS

    if config.trainer not in TRAINERS:
        raise unknown_name_error("trainer", config.trainer, TRAINERS, field="trainer")
    from align.training.async_rollout import check_async_rollout

    check_async_rollout(config, adapter)
    check_adapter_name(config.model.name)
    check_ranges(config)
    config.rollout.validate()
    config.eval.validate()
    if hasattr(config, "ppo"):  # the PPO-family trainers' block (align/trainers/ppo.py)
        config.ppo.validate(config.trainer)
    if config.run.fully_shard and config.rollout.max_batch:  # every sharded call gathers on every process
        raise ConfigError("rollout.max_batch: with run.fully_shard every model call is collective, and chunks "
                          "would make the processes' call counts differ; leave it null")
    from align.training.optim import check_optimizer

    check_optimizer(config.optim)
    if config.run.fully_shard and config.optim.name == "adamw8bit":
        raise ConfigError("optim.name adamw8bit: bitsandbytes' 8-bit states are not sharded; it is not supported "
                          "with run.fully_shard (use adamw)")
    if config.run.fully_shard and not config.lora.enabled and config.model.train_experts != "both":
        from align.training.model_setup import SHARDED_EXPERT_ERROR

        raise ConfigError(SHARDED_EXPERT_ERROR)
    if config.run.fully_shard and config.optim.ema_decay is not None:
        raise ConfigError("optim.ema_decay: the EMA keeps whole copies of the weights; it is not supported with "
                          "run.fully_shard")
    if adapter is not None:
        family, model = ("flow" if adapter.prediction_type == "flow" else "ddpm"), adapter.name
    else:
        family, model = ("flow" if config.model.name in FLOW_ADAPTERS else "ddpm"), config.model.name
    for field_name, kernel in (("rollout.kernel", config.rollout.kernel), ("eval.kernel", config.eval.kernel)):
        spec = kernel_spec(kernel, field=field_name)
        if spec.schedule_kind not in (family, "any"):
            hint = " (flow models train with flow_grpo and its family)" if family == "flow" else ""
            raise ConfigError(f"{field_name}: step kernel {kernel!r} is for {spec.schedule_kind} models; "
                              f"{model!r} is a {family} model{hint}")
    floor = adapter_class(config.model.name).min_guidance_scale if adapter is None else adapter.min_guidance_scale
    for field_name, scale in (("rollout.guidance_scale", config.rollout.guidance_scale),
                              ("eval.guidance_scale", config.eval.guidance_scale)):
        if floor is not None and scale is not None and scale < floor:
            raise ConfigError(f"{field_name}: {scale:g} is below {floor:g}, the smallest scale the {model!r} model "
                              f"takes (1: no guidance)")
    if not config.prompts and not config.prompt_file:
        raise ConfigError("prompts is empty: give at least one prompt (or a prompt_file)")
    if not config.eval_prompts:
        raise ConfigError("eval_prompts is empty: give at least one evaluation prompt")
    check_device(config.model.device)
    from align.attention import check_attention_backend

    check_attention_backend(config.model.attention_backend)
    if adapter is None:
        check_model_source(config.model)
    check_precision(config.run.mixed_precision, config.model.device)
    if config.run.log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("run.log_with wandb needs wandb: pip install 'align-diffusion[wandb]' (or log_with: "
                              "tensorboard)")
    check_run_folder(config)
    check_reward_specs(config.rewards, "rewards")
    check_reward_specs(heldout_specs(config), "heldout_rewards")


def require_stochastic_kernel(rollout_config) -> None:
    """Trainers of transition log-probs need a stochastic kernel: a deterministic one (ode,
    dpm_solver) records no transition to train."""
    from align.sampling.kernels import KERNELS, kernel_spec

    if not kernel_spec(rollout_config.kernel).stochastic:
        valid = sorted(k for k, spec in KERNELS.items() if spec.stochastic)
        raise ConfigError(f"rollout.kernel: {rollout_config.kernel!r} is deterministic and records no log-probs "
                          f"to train; use a stochastic kernel ({', '.join(valid)})")


def require_trained_steps(rollout_config, train_last_step: bool, first: int = 0) -> None:
    """A ConfigError when no stochastic step from ``first`` on is left to train (the last one only
    counts with ``train_last_step``): the run would make updates without a loss. The kernel must be
    stochastic first (:func:`require_stochastic_kernel`)."""
    require_stochastic_kernel(rollout_config)
    steps = rollout_config.num_steps
    stochastic = set(range(steps)) if rollout_config.sde_steps is None else set(rollout_config.sde_steps)
    trained = [s for s in stochastic if s >= first and (train_last_step or s != steps - 1)]
    if not trained:
        raise ConfigError(f"no step to train: the stochastic steps {sorted(stochastic)} of rollout.num_steps={steps} "
                          f"leave none from step {first} on"
                          + ("" if train_last_step else " but the last (set train_last_step=true, or more steps)"))


def check_trained_steps(run, config: TrainerConfig) -> None:
    """With one expert frozen (``model.train_experts``), a trainer of transition log-probs needs a
    stochastic step of the trained expert (or an SDE window, drawn among them): one line if none."""
    from align.sampling.kernels import kernel_spec

    trained = steps_of_trained_networks(run.adapter, config.rollout.num_steps, run.latent_kwargs)
    if trained is None or not kernel_spec(config.rollout.kernel).stochastic or getattr(config, "window_size", None):
        return
    steps = config.rollout.sde_steps
    stochastic = set(range(config.rollout.num_steps)) if steps is None else set(steps)
    if not stochastic & trained:
        raise ConfigError(f"model.train_experts={config.model.train_experts}: none of the stochastic steps "
                          f"{sorted(stochastic)} uses the trained expert (its steps: {sorted(trained)})")


def steps_of_trained_networks(adapter, num_steps: int, latent_kwargs: dict) -> set[int] | None:
    """The sampling steps whose network trains, when only some do (one expert of Wan 2.2 A14B;
    ``model.train_experts``); None when every step's does."""
    schedule = adapter.schedule(num_steps, latent_shape=adapter.latent_shape(**latent_kwargs))
    experts = [adapter.expert_at(t) for t in schedule.timesteps]
    trained = getattr(adapter, "trained_expert_indices", None)
    if trained is None or all(e is None or e in trained for e in experts):
        return None
    return {i for i, e in enumerate(experts) if e in trained}
