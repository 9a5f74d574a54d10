"""The run around each recipe's iterations: the start
(validation, rewards, prompts, the run, resume, the first evaluation), the iteration loop with its
progress bar, the end of an iteration (counters, log, checkpoint, periodic evaluation) and the
finish (final evaluation, LoRA export, the summary line)."""

from __future__ import annotations

import shutil
from pathlib import Path

from align.prompts import check_prompt_images, prompt_list
from align.trainers.checks import check_trained_steps
from align.trainers.config import TrainerConfig
from align.trainers.scoring import build_reward_set
from align.training import checkpointing, evaluation, trackers
from align.training.optim import ema_weights
from align.training.run import TOY_EVAL_PROMPTS, TOY_PROMPTS, Run
from pipelines.registry import model_tasks


def eval_prompt_list(config: TrainerConfig) -> list[str]:
    """The evaluation prompts: ``eval_prompt_file`` when set, else ``eval_prompts``."""
    return prompt_list(config.eval_prompts, config.eval_prompt_file, TOY_EVAL_PROMPTS)


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
    folder = Path(config.run.output_dir)
    fresh_folder = not folder.exists()
    try:
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
    except BaseException:
        # a start that fails writes nothing: a folder left behind would look like a run to continue
        if fresh_folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise
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
    """The run's last line, ``reward before=<x> after=<y>`` followed by each dimension of the trained
    reward (``eval/reward/<dimension>``) and each watched metric (held-out rewards, diversity) as
    ``name=<before>-><after>``; preceded by a warning line when the trained reward rose while a
    watched metric fell by more than ``tolerance`` of its size (the mark of reward hacking; smaller
    moves are evaluation noise)."""
    dims = [k for k in watched_after if k.startswith("eval/reward/")]
    watched = [k for k in watched_after if k.startswith("eval/heldout/") or k == "eval/diversity"]
    parts = [f"{k.split('/', 2)[-1]}={watched_before[k]:.4f}->{watched_after[k]:.4f}" if k in watched_before
             else f"{k.split('/', 2)[-1]}={watched_after[k]:.4f}" for k in dims + watched]
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
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.run.last_rewards.items()})
                if self.stop_requested:
                    name = f"iteration-{self.run.state.iteration:06d}"
                    if not any(p.name == name for p in checkpointing.checkpoints(self.run)):
                        checkpointing.save_checkpoint(self.run)
                    raise KeyboardInterrupt
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            self.bar.close()


