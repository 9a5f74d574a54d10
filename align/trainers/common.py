"""The config fields every trainer shares, and its start / finish (rewards, evaluation, summary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError, unknown_name_error
from align.evaluation import EvalConfig
from align.prompts import check_prompt_images, prompt_list
from align.models import ModelConfig
from align.sampling.rollout import RolloutConfig
from align.training import checkpointing, evaluation, trackers
from align.training.model_setup import LoraSettings
from align.training.optim import OptimConfig, ema_weights
from align.training.run import TOY_EVAL_PROMPTS, TOY_PROMPTS, Run, RunConfig
from pipelines.registry import adapter_class, model_tasks


@dataclass
class TrainerConfig:
    #: the trainer this config is for (each trainer's config sets it; a method preset names it)
    trainer: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    #: trained reward(s): names or {name, weight, normalize, **options}
    rewards: list[Any] = field(default_factory=lambda: ["digit"])
    #: rewards only watched on the evaluation samples (reward hacking shows as these falling); null:
    #: the model's default (the embedded toy model's is the independent digit judge, ``digit_judge``)
    heldout_rewards: list[Any] | None = None
    prompts: list[str] = field(default_factory=lambda: list(TOY_PROMPTS))
    prompt_file: str | None = None
    eval_prompts: list[str] = field(default_factory=lambda: list(TOY_EVAL_PROMPTS))
    #: evaluation prompts from a file, in prompt_file's forms (the JSONL one names the images of
    #: image-to-video); null: eval_prompts
    eval_prompt_file: str | None = None
    negative_prompt: str = ""
    #: evaluation on eval_prompts (kernel, steps, guidance, negative prompt, seed, samples per prompt)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterations: int = 100
    #: stop early once this many model evaluations (summed over processes) are spent
    max_nfe: int | None = None
    prompts_per_iteration: int = 4
    group_size: int = 8
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


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
    check_run_folder(config)
    check_reward_specs(config.rewards, "rewards")
    check_reward_specs(heldout_specs(config), "heldout_rewards")


def heldout_specs(config: TrainerConfig) -> list:
    """The run's held-out rewards: ``heldout_rewards``, or the model's default when it is null."""
    from pipelines.registry import DEFAULT_HELDOUT_REWARDS

    if config.heldout_rewards is not None:
        return list(config.heldout_rewards)
    return list(DEFAULT_HELDOUT_REWARDS.get(config.model.name, []))


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
    counts with ``train_last_step``): the run would make updates without a loss."""
    steps = rollout_config.num_steps
    stochastic = set(range(steps)) if rollout_config.sde_steps is None else set(rollout_config.sde_steps)
    trained = [s for s in stochastic if s >= first and (train_last_step or s != steps - 1)]
    if not trained:
        raise ConfigError(f"no step to train: the stochastic steps {sorted(stochastic)} of rollout.num_steps={steps} "
                          f"leave none from step {first} on"
                          + ("" if train_last_step else " but the last (set train_last_step=true, or more steps)"))


def build_reward_set(config: TrainerConfig):
    """(trained reward, {name: held-out reward}); unknown names fail here, before any model loads."""
    from rewards import build_reward, build_rewards

    reward = build_rewards(list(config.rewards))
    heldout = {}
    for spec in heldout_specs(config):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        heldout[spec.get("key", spec["name"])] = build_reward({k: v for k, v in spec.items() if k != "key"})
    return reward, heldout


def eval_prompt_list(config: TrainerConfig) -> list[str]:
    """The evaluation prompts: ``eval_prompt_file`` when set, else ``eval_prompts``."""
    return prompt_list(config.eval_prompts, config.eval_prompt_file, TOY_EVAL_PROMPTS)


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


def start_run(config: TrainerConfig, adapter=None, state=None):
    """Validate (the trainer's own ``check_config``, which starts with :func:`check_common`: no
    trainer opens a run without the validation pass), build rewards and prompts, open the run,
    resume, and evaluate the start point. ``state``: the trainer's state dataclass, saved and
    resumed with every checkpoint as ``run.state.trainer``. Returns (run, reward, heldout, prompts)."""
    from align.trainers import trainer_module

    trainer_module(config.trainer).check_config(config, adapter)
    reward, heldout = build_reward_set(config)
    prompts = prompt_list(config.prompts, config.prompt_file, TOY_PROMPTS)
    # the checkpoint's own tasks (a Wan 2.2 A14B folder is text-to-video only), read before it loads
    name, tasks = ((adapter.name, adapter.tasks) if adapter is not None else
                   (config.model.name, model_tasks(config.model.name, config.model.path)))
    check_prompt_images(prompts, name, tasks)
    check_prompt_images(eval_prompt_list(config), name, tasks, field="eval_prompt_file")
    run = Run(config, model=config.model, lora=config.lora, optim=config.optim, run=config.run, adapter=adapter,
              trainer_state=state)
    check_prompt_images(prompts, run.adapter.name, run.adapter.tasks)  # a hub checkpoint's tasks, known now
    check_trained_steps(run, config)
    device = run.accelerator.device
    reward.to(device)
    for extra in heldout.values():
        extra.to(device)
    checkpointing.resume(run)
    checkpointing.describe_run(run)
    if run.state.reward_before is None:
        before = evaluate_run(run, config, reward, heldout, "before")
        run.state.reward_before = before["eval/reward"]
        run.state.heldout_before = {k: v for k, v in before.items() if k != "eval/reward"}
        log_evaluation(run, before)
    run.start_clock()  # training wall time (run.state.seconds) counts from here
    return run, reward, heldout, prompts


def log_evaluation(run, metrics: dict[str, float]) -> None:
    """Log an evaluation at the run's current iteration with the compute spent to reach it
    (``nfe`` and training ``wall_s``): the points of reward-vs-compute curves."""
    trackers.log(run, {**metrics, "nfe": run.state.nfe, "wall_s": run.state.seconds}, step=run.state.iteration)


def evaluate_run(run, config: TrainerConfig, reward, heldout, grid_name: str) -> dict[str, float]:
    """The run's evaluation (``config.eval``) on the evaluation prompts, with its sample grid."""
    return evaluation.evaluate(run, reward, eval_prompt_list(config), config.rollout, config.eval,
                        negative_prompt=config.negative_prompt, heldout=heldout, grid_name=grid_name)


def summary_lines(before: float, after: float, watched_before: dict[str, float],
                  watched_after: dict[str, float], tolerance: float = 0.05) -> list[str]:
    """The run's last line, ``reward before=<x> after=<y>`` followed by each watched metric (held-out
    rewards, diversity) as ``name=<before>-><after>``; preceded by a warning line when the trained
    reward rose while a watched metric fell by more than ``tolerance`` of its size (the mark of
    reward hacking; smaller moves are evaluation noise)."""
    watched = [k for k in watched_after if k.startswith("eval/heldout/") or k == "eval/diversity"]
    parts = [f"{k.split('/')[-1]}={watched_before[k]:.4f}->{watched_after[k]:.4f}" if k in watched_before
             else f"{k.split('/')[-1]}={watched_after[k]:.4f}" for k in watched]
    fell = [k.split("/")[-1] for k in watched if k in watched_before
            and watched_after[k] < watched_before[k] - tolerance * abs(watched_before[k])]
    lines = []
    if after > before and fell:
        lines.append(f"watch: {', '.join(fell)} fell while the trained reward rose: look at the after grid "
                     f"for reward hacking")
    lines.append(f"reward before={before:.4f} after={after:.4f}" + "".join(f" {p}" for p in parts))
    return lines


def finish_run(config: TrainerConfig, run, reward, heldout) -> dict[str, float]:
    """Final evaluation, LoRA export, and the one summary line ``reward before=<x> after=<y>``."""
    if config.run.checkpoint_every and not any(p.name == f"iteration-{run.state.iteration:06d}"
                                               for p in checkpointing.checkpoints(run)):
        checkpointing.save_checkpoint(run)  # the finished state: a rerun says the run is done instead of redoing steps
    after = evaluate_run(run, config, reward, heldout, "after")
    log_evaluation(run, after)
    if config.lora.enabled:
        with ema_weights(run):  # the EMA's LoRA when EMA is on (what the evaluation measured)
            checkpointing.export_lora(run, run.dir / "lora")
    summary = {"reward_before": run.state.reward_before, "reward_after": after["eval/reward"], **after}
    lines = summary_lines(run.state.reward_before, after["eval/reward"], run.state.heldout_before or {}, after)
    for line in lines:
        trackers.log_text(run, line)
        if run.is_main:
            print(line, flush=True)
    run.accelerator.end_training()
    return summary


def shuffled_minibatches(rows, batch: int, seed: int) -> list:
    """``rows`` (row indices, or a row count) in a seeded random order, cut into minibatches of
    ``batch``, each sorted back into the rollout's order. A minibatch of every row is then the
    rollout's batch row for row, and its re-score repeats the rollout's model call bit for bit: a
    CPU GEMM's result for a row can depend on the row's place in the batch."""
    import torch

    rows = torch.arange(rows) if isinstance(rows, int) else rows
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return [order[start:start + batch].sort().values for start in range(0, len(order), batch)]


class TrainLog(dict):
    """One iteration's training statistics, name -> list of floats, averaged into ``train/<name>``;
    and ``train/on_policy_approx_kl`` / ``train/on_policy_clip_fraction``, the largest over the
    terms seen before the iteration's first update (exactly 0 when training re-scores every
    transition as the rollout scored it, however many updates follow)."""

    def __init__(self, *names: str) -> None:
        super().__init__({name: [] for name in ("loss", "grad_norm", *names)})
        self.on_policy: dict[str, float] = {}
        #: optimizer updates made this iteration
        self.updates = 0

    def add(self, loss=None, **stats) -> None:
        if loss is not None:
            self["loss"].append(float(loss.detach()))
        for key, value in stats.items():
            self.setdefault(key, []).append(float(value))
        if not self.updates:  # no update yet this iteration: the policy is the rollout's
            for key in ("approx_kl", "clip_fraction"):
                if key in stats:
                    self.on_policy[key] = max(self.on_policy.get(key, 0.0), float(stats[key]))

    def record_update(self, norm: float | None) -> bool:
        """Record what ``run.optimizer_step()`` returned: the gradient norm of an update (also of
        one skipped for a non-finite gradient), or None while gradients are still accumulating.
        Returns whether an update was made."""
        if norm is None:
            return False
        self["grad_norm"].append(norm)
        self.updates += 1
        return True

    def metrics(self) -> dict[str, float]:
        out = {f"train/{k}": sum(v) / len(v) for k, v in self.items() if v}
        out["train/updates"] = float(self.updates)
        out.update({f"train/on_policy_{k}": v for k, v in self.on_policy.items()})
        return out


def reward_metrics(named: dict, valid=None) -> dict[str, float]:
    """reward/<name>/mean and /std of each reward dimension over the scored rows of the (gathered)
    batch, and ``reward/unscored``, the number of rows the reward could not score."""
    import torch

    metrics = {}
    for k, v in named.items():
        ok = torch.isfinite(v) if valid is None else torch.isfinite(v) & valid.to(v.device).bool()
        values = v.float()[ok]
        metrics[f"reward/{k}/mean"] = float(values.mean()) if len(values) else 0.0
        metrics[f"reward/{k}/std"] = float(values.std(unbiased=False)) if len(values) else 0.0
    if valid is not None:
        metrics["reward/unscored"] = float((~valid.bool()).sum())
    return metrics


def end_iteration(run, config: TrainerConfig, reward, heldout, metrics: dict[str, float], nfe: int) -> None:
    """Count the iteration and its model evaluations (all processes), log, checkpoint and write
    the periodic sample grid."""
    run.state.iteration += 1
    spent_before = run.state.nfe
    run.state.nfe += nfe * run.accelerator.num_processes
    run.count_training_time()
    trackers.log(run, {**metrics, "nfe": run.state.nfe, "wall_s": run.state.seconds}, step=run.state.iteration)
    every = config.run.checkpoint_every
    if every and run.state.iteration % every == 0:
        checkpointing.save_checkpoint(run)
    if config.run.sample_every and run.state.iteration % config.run.sample_every == 0:
        log_evaluation(run, evaluate_run(run, config, reward, heldout, f"iteration-{run.state.iteration:06d}"))
    elif config.run.eval_every_nfe and run.state.nfe // config.run.eval_every_nfe > spent_before // config.run.eval_every_nfe:
        log_evaluation(run, evaluate_run(run, config, reward, heldout, None))
    run.start_clock()  # evaluations do not count as training time


class progress:
    """The iteration loop with a progress bar that starts where a resumed run left off and stops
    early once ``max_nfe`` model evaluations are spent. Ctrl-C (SIGINT) lets the running iteration
    finish, checkpoints it and raises KeyboardInterrupt; a second Ctrl-C stops at once (the last
    checkpoint is kept)."""

    def __init__(self, run, config: TrainerConfig, name: str) -> None:
        from tqdm.auto import tqdm

        self.run, self.max_nfe = run, config.max_nfe
        self.stop_requested = False
        self.bar = tqdm(range(run.state.iteration, config.iterations), desc=name, initial=run.state.iteration,
                        total=config.iterations, disable=not (run.run_config.progress and run.is_main))

    def _on_sigint(self, signum, frame) -> None:
        import signal
        import sys

        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C stops now
        print(f"\nalign: Ctrl-C: stopping after iteration {self.run.state.iteration + 1} (Ctrl-C again stops now)",
              file=sys.stderr, flush=True)

    def __iter__(self):
        import signal
        import threading

        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            for iteration in self.bar:
                if self.max_nfe is not None and self.run.state.nfe >= self.max_nfe:
                    break
                yield iteration
                if self.stop_requested:
                    name = f"iteration-{self.run.state.iteration:06d}"
                    if not any(p.name == name for p in checkpointing.checkpoints(self.run)):
                        checkpointing.save_checkpoint(self.run)
                    raise KeyboardInterrupt
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            self.bar.close()

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)


def sample_and_score(run, config: TrainerConfig, reward, batch_prompts, rollout_config, iteration: int, *,
                     score: str = "samples", grad_steps=(), checkpoint_grad_steps: bool = False,
                     group_size: int | None = None, drift=None, keep_policy_graph: str | None = None):
    """Encode the prompts, roll out ``group_size`` (default ``config.group_size``) samples of each
    (seeded by iteration and process), decode and score them: ``score`` "samples" (the final main
    rows), "branches" (the rollout's side branches, e.g. TempFlow's children) or "both" (DenseGRPO's
    final samples and ODE completions). ``grad_steps`` keeps gradients through those steps' model
    calls (reward backprop; ``checkpoint_grad_steps`` recomputes them in backward); otherwise
    sampling runs without a graph. ``drift``: the rollout's drift hook (guided sampling).
    ``keep_policy_graph``: a CFG gradient ("cond_only" / "full") with which the stochastic steps'
    model calls keep their graphs (:func:`align.sampling.rollout.rollout`), or None. Returns (cond,
    rollout result, scores of the samples or None, scores of the branches or None)."""
    import torch

    from align.training.run import iteration_generator
    from align.sampling.rollout import rollout

    from align.sampling.overlap import can_chunk, chunk_generators, chunked_rollout_and_score, prompt_chunks

    adapter, process = run.adapter, run.accelerator.process_index
    chunks = config.run.rollout_chunks
    graph = {"keep_policy_graph": True, "cfg_grad": keep_policy_graph} if keep_policy_graph else {}
    if score == "samples" and can_chunk(rollout_config, chunks, len(batch_prompts), drift=drift, grad_steps=grad_steps,
                                         reward=reward):
        with run.sampling():
            cond = adapter.encode(batch_prompts, config.negative_prompt, rollout_config.guidance_scale)
            generators = chunk_generators(config.run.seed, iteration, process, chunks)
            result, result.pixels, scores = chunked_rollout_and_score(
                adapter, cond, rollout_config, group_size=config.group_size if group_size is None else group_size,
                generators=generators[:len(prompt_chunks(len(batch_prompts), chunks))], reward=reward,
                prompts=list(batch_prompts), overlap=config.run.overlap_scoring, **graph, **run.latent_kwargs)
        check_unscored(run, reward, scores.valid_mask(), iteration)
        result.transitions = trained_transitions(adapter, result.transitions)
        return cond, result, scores, None
    with run.sampling() if not grad_steps else run.accelerator.autocast():
        cond = adapter.encode(batch_prompts, config.negative_prompt, rollout_config.guidance_scale)
        rows = config.group_size if group_size is None else group_size
        result = rollout(adapter, cond, rollout_config, group_size=rows,
                         generator=iteration_generator(config.run.seed, iteration, process), grad_steps=grad_steps,
                         checkpoint_grad_steps=checkpoint_grad_steps, drift=drift, **graph, **run.latent_kwargs)
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float() if score in ("samples", "both") else None
        result.pixels = pixels
        branch_pixels = (adapter.decode(result.branch_samples.to(adapter.dtype)).float()
                         if score in ("branches", "both") else None)
    with run.phase("reward"), torch.set_grad_enabled(bool(grad_steps)):
        scores = branch_scores = None
        if pixels is not None:
            scores = reward(pixels, [batch_prompts[i] for i in result.prompt_index.tolist()])
        if branch_pixels is not None:
            branch_scores = reward(branch_pixels, [batch_prompts[i] for i in result.branch_prompt_index.tolist()])
    for out in (scores, branch_scores):
        if out is not None:
            check_unscored(run, reward, out.valid_mask(), iteration)
    result.transitions = trained_transitions(adapter, result.transitions)
    return cond, result, scores, branch_scores


def trained_transitions(adapter, transitions: list) -> list:
    """The transitions whose network trains: with one expert of Wan 2.2 A14B frozen
    (``model.train_experts``), its steps have a ratio of exactly 1 and no gradient, so they would
    only cost a forward and backward each and dilute the loss's mean."""
    trained = getattr(adapter, "trained_expert_indices", None)
    if trained is None:
        return transitions
    return [t for t in transitions if t.expert is None or t.expert in trained]


def check_unscored(run, reward, valid, iteration: int) -> None:
    """The unscored-sample policy: rows the reward could not score (its valid flag) are dropped from
    their groups and counted; when more than ``run.max_unscored_fraction`` of the iteration's batch
    (all processes) is unscored, the run stops with a one-line RewardError naming the reward."""
    from rewards.base import RewardError

    everything = run.gather(valid.bool())
    unscored = int((~everything).sum())
    limit = run.run_config.max_unscored_fraction
    if unscored and unscored > limit * len(everything):
        raise RewardError(f"the trained reward ({getattr(reward, 'name', type(reward).__name__)}) could not score "
                          f"{unscored} of the {len(everything)} samples of iteration {iteration + 1} (more than "
                          f"run.max_unscored_fraction={limit}): is its server down? the last checkpoint is intact")


def group_batch_advantages(run, reward, scores, groups, *, std: str, clip: float, multi_reward: str = "sum_rewards"):
    """Group advantages from the gathered batch (``groups``: this process's group ids, unique
    across processes). ``sum_rewards`` trains exactly the reward's total (a combination's weighted,
    normalised total); ``sum_advantages`` (MixGRPO) sums the advantages of the combination's
    top-level rewards, each normalised on its own, with their configured weights. Unscored rows
    (the reward's valid flag) are dropped from their groups. Returns this process's (advantages,
    keep), the gathered named scores and the gathered valid mask."""
    from align.advantages import group_advantages, mixed_advantages
    from rewards.base import CombinedReward

    accelerator = run.accelerator
    all_groups = run.gather(groups)
    valid = run.gather(scores.valid_mask())
    named = {k: run.gather(v.float()) for k, v in scores.scores.items()}
    if multi_reward == "sum_advantages" and isinstance(reward, CombinedReward):
        top = {k: named[k] for k in reward.rewards}
        advantages, keep = mixed_advantages(top, reward.weights, all_groups, "sum_advantages", valid=valid,
                                            std=std, clip=clip)
    else:
        advantages, keep = group_advantages(run.gather(scores.total.float()), all_groups, std=std, clip=clip,
                                            valid=valid)
    rows = len(groups)
    local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
    return advantages[local], keep[local], named, valid


# --- rewards that learn during a run ------------------------------------------------------------
def learning_rewards(**rewards) -> dict:
    """The rewards that learn during a run (they have ``trainable_state``: adv_dino's discriminator
    head, a latent PRM), found inside combinations, by ``<argument>.<key>`` (e.g. ``rewards.adv_dino``)."""
    from rewards.base import CombinedReward

    found = {}
    for prefix, reward in rewards.items():
        if reward is None:
            continue
        parts = reward.rewards.items() if isinstance(reward, CombinedReward) else [(reward.name, reward)]
        for key, part in parts:
            if hasattr(part, "trainable_state"):
                found[f"{prefix}.{key}"] = part
    return found


def restore_reward_states(run, learning: dict) -> None:
    """On resume, the learning rewards' weights, optimisers and counters from the checkpointed state."""
    saved = run.state.trainer.reward_states
    for key, reward in learning.items():
        if key in saved:
            reward.load_trainable_state(saved[key])


def store_reward_states(run, learning: dict) -> None:
    """The learning rewards' current state into the run state, so the next checkpoint holds it."""
    if learning:
        run.state.trainer.reward_states = {key: reward.trainable_state() for key, reward in learning.items()}
