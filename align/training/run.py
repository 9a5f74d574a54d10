"""The training session: RunConfig, the run state saved with every checkpoint (counters and the
trainer's typed state), the per-iteration prompt draw and generators, and :class:`Run`."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.config import check_choice
from align.errors import ConfigError
from align.training.model_setup import SHARDED_EXPERT_ERROR, LoraSettings, setup_model
from align.training.optim import OptimConfig, build_ema, build_optimizer, optimizer_step
from align.training.trackers import TRACKERS, init_trackers

TOY_PROMPTS = [f"a {c} digit {d}" for d in range(10) for c in ("red", "green", "blue", "yellow")]
TOY_EVAL_PROMPTS = ["a red digit 3", "a blue digit 5", "a green digit 8", "a yellow digit 1"]

MIXED_PRECISION = ("no", "bf16", "fp16", "fp8")


@dataclass
class RunConfig:
    #: the run folder (null: a fresh ``runs/<trainer>-<date>-<time>`` per run)
    output_dir: str | None = None
    #: seed of the run: torch / numpy / random at the start, each iteration's prompt draw, rollout noise and
    #: training draws (a resumed run replays them)
    seed: int = 0
    #: auto: continue output_dir's newest checkpoint when the run there has the same settings (a
    #: changed setting or another trainer is refused); latest: as auto, and with a null output_dir
    #: the newest runs/<trainer>-* folder; a checkpoint folder: continue from it with this config's
    #: settings; null: start over (align/training/run_folder.py)
    resume: str | None = "auto"
    #: save a checkpoint every N iterations, and the finished state at the end (0: no checkpoints)
    checkpoint_every: int = 10
    #: keep the newest N checkpoints of the run folder; older ones are deleted
    checkpoint_limit: int = 2
    #: tensorboard (offline, default), wandb, or none
    log_with: str = "tensorboard"
    #: no, bf16 or fp16 (accelerate autocast)
    mixed_precision: str = "no"
    #: minibatches per optimizer update (may span iterations; a resume redoes a partial one)
    gradient_accumulation_steps: int = 1
    #: recompute the denoiser's activations in backward (diffusers models): less memory, ~30% slower
    gradient_checkpointing: bool = False
    #: torch.compile the denoiser (its repeated blocks, or the whole model) for rollouts and training
    compile: bool = False
    #: torch.compile options, e.g. {mode: max-autotune} or {backend: aot_eager} (tracing without codegen)
    compile_options: dict = field(default_factory=dict)
    #: shard the denoiser with torch's FSDP2 fully_shard instead of DDP where accelerate runs the
    #: processes as DDP (CPU processes over gloo; align/sharding.py); on GPUs use accelerate's FSDP2
    #: plugin (configs/accelerate/fsdp.yaml). One process: nothing to shard, ignored
    fully_shard: bool = False
    #: write a sample grid of the evaluation prompts every N iterations (0: only before / after)
    sample_every: int = 0
    #: evaluate (metrics only, no grid) each time the run's model evaluations pass a multiple of N
    #: (0: off): reward-vs-compute curves comparable across methods (sweeps set it)
    eval_every_nfe: int = 0
    #: show the iteration progress bar and the resume message on the main process (false: quiet)
    progress: bool = True
    #: roll an iteration's prompts out in this many chunks, each decoded and scored while the next
    #: samples (align/sampling/overlap.py; topologies without splits or branches); 1: one piece
    rollout_chunks: int = 1
    #: score chunk k in a worker thread while chunk k + 1 samples (false: score it first; the same results)
    overlap_scoring: bool = True
    #: stop the run when more than this fraction of an iteration's samples is unscored (the
    #: reward's valid flag: a server down, OCR with no text); below it they are dropped and counted
    max_unscored_fraction: float = 0.5
    #: sample on Ray actors while the trainer trains (align/training/async_rollout.py; ray.address: a
    #: cluster); the trainer consumes batches at most max_staleness weight versions old
    async_rollout: bool = False
    #: run.async_rollout: rollout workers (Ray actors), each with a copy of the model and the reward
    rollout_workers: int = 1
    #: run.async_rollout: how many iterations' weight versions a batch may lag the trainer (0: each batch is
    #: sampled with the weights it trains; with one worker that is the synchronous run, bit for bit)
    max_staleness: int = 1
    #: run.async_rollout: a stale batch's importance weights pi_now / pi_sampled per trained step are
    #: truncated at this value (trainers with log-probs; the PPO ratio then starts from the current policy)
    max_importance_weight: float = 2.0
    #: run.async_rollout: the GPUs each rollout worker asks Ray for (1: a GPU of its own, 0.5: two workers a
    #: GPU; Ray then shows the worker only those); 0: none, the workers load on model.device as they see it
    rollout_worker_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.mixed_precision in (False, "False", "false"):  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        check_choice("run.mixed_precision", self.mixed_precision, MIXED_PRECISION, "precision")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"run.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        check_choice("run.log_with", self.log_with, TRACKERS, "tracker")
        if not 0 <= self.max_unscored_fraction <= 1:
            raise ConfigError(f"run.max_unscored_fraction must be in [0, 1], got {self.max_unscored_fraction}")
        if self.rollout_workers < 1 or self.max_staleness < 0 or self.max_importance_weight < 1:
            raise ConfigError(f"run.rollout_workers must be >= 1, run.max_staleness >= 0 and run.max_importance_weight "
                              f">= 1, got {self.rollout_workers}, {self.max_staleness}, {self.max_importance_weight}")
        if self.rollout_worker_gpus < 0:
            raise ConfigError(f"run.rollout_worker_gpus must be >= 0, got {self.rollout_worker_gpus}")


@dataclass
class RayConfig:
    #: the Ray cluster of run.async_rollout's workers: its address (e.g. ray://head:10001 or auto); null: the
    #: cluster of RAY_ADDRESS, else a Ray instance started on this machine
    address: str | None = None


@dataclass
class TrainState:
    """Counters saved with every checkpoint, and the trainer's own state (``trainer``: the typed
    dataclass each trainer declares, e.g. GRPO-Guard's log-ratio scale, DenseGRPO's calibrated
    noise levels), saved and resumed with them."""

    iteration: int = 0
    nfe: int = 0
    #: wall seconds of training so far (evaluations excluded), over every resume
    seconds: float = 0.0
    reward_before: float | None = None
    heldout_before: dict | None = None
    #: optimizer updates made, and those skipped for a non-finite gradient
    updates: int = 0
    skipped_updates: int = 0
    #: the trainer's state dataclass (None: the trainer keeps nothing beyond the counters)
    trainer: Any = None

    def state_dict(self) -> dict:
        """The counters, and the trainer's state as {field: value} (tensors kept as tensors)."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items() if k != "trainer"}
        if self.trainer is not None:
            out["trainer"] = {f.name: getattr(self.trainer, f.name) for f in dataclasses.fields(self.trainer)}
        return out

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key == "trainer":
                for name, field_value in (value or {}).items():
                    if self.trainer is not None and hasattr(self.trainer, name):
                        setattr(self.trainer, name, field_value)
            elif key in TrainState.__dataclass_fields__:
                setattr(self, key, value)


class Run:
    """The training session of one trainer: the accelerator, the model and its optimizer, the run
    folder and the run state. Its jobs live in modules named for them: model set-up
    (align/training/model_setup.py), the optimizer, its step and the EMA (optim.py), checkpoints and
    resume (checkpointing.py), trackers and logs (trackers.py), evaluation (evaluation.py)."""

    def __init__(self, config: Any, *, model, lora: LoraSettings, optim: OptimConfig,
                 run: RunConfig, adapter=None, trainer_state=None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        from align.models import resolve_device
        from align.sharding import has_sharded

        if model.lora is not None:
            raise ConfigError("model.lora loads a LoRA for sampling; to go on training a run, use run.resume")
        self.config, self.run_config = config, run
        #: image / video size of every rollout of the run (null: the model's default)
        self.latent_kwargs = {"height": model.height, "width": model.width, "num_frames": model.num_frames}
        self.dir = Path(run.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.phase_seconds: dict[str, float] = {}
        #: the mean of each reward dimension in the last iteration logged (the progress bar's figures)
        self.last_rewards: dict[str, float] = {}
        # accelerate keeps one process-wide state and refuses a second Accelerator with other
        # settings (bf16 after fp32); a process may run several trainings (sweeps, notebooks, tests),
        # so each run starts from a clean one. The distributed setup (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision, cpu=resolve_device(model.device).type == "cpu",
            gradient_accumulation_steps=run.gradient_accumulation_steps,
            log_with=None if run.log_with == "none" else run.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.dir), logging_dir=str(self.dir / "logs")))
        set_seed(run.seed)
        shard_here = setup_model(self, model, lora, adapter)  # self.adapter
        params = self.adapter.trainable_parameters()  # after sharding: the sharded parameters
        if not params:
            raise ConfigError("nothing to train: no trainable parameter after the LoRA / fine-tune set-up")
        self.optim_config = optim
        self.optimizer = build_optimizer(params, optim)
        if shard_here:  # fully_shard synchronises gradients itself: no DDP wrapper
            self.optimizer = self.accelerator.prepare(self.optimizer)
        else:
            self.adapter.denoiser, self.optimizer = self.accelerator.prepare(self.adapter.denoiser, self.optimizer)
        #: the weights are DTensors (run.fully_shard, or accelerate's FSDP2): saving gathers on every process
        self.sharded = has_sharded(self.adapter.base_denoiser.parameters())
        if self.sharded and not lora.enabled and getattr(model, "train_experts", "both") != "both":
            raise ConfigError(SHARDED_EXPERT_ERROR)
        self.ema = build_ema(params, optim)
        self.state = TrainState(trainer=trainer_state)
        #: non-finite updates in a row (optim.optimizer_step stops the run at MAX_BAD_UPDATES)
        self.bad_updates = 0
        #: when the training time now running began (evaluations do not count)
        self._clock = time.perf_counter()
        init_trackers(self, config)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def accumulate(self):
        """Wraps one minibatch's forward and backward passes: accelerate counts it toward
        ``gradient_accumulation_steps`` (``accelerator.backward`` divides each loss by that count)
        and skips the DDP gradient all-reduce until the minibatch that completes an update."""
        return self.accelerator.accumulate(self.adapter.denoiser)

    def optimizer_step(self) -> float | None:
        """:func:`align.training.optim.optimizer_step`: clip, step, zero once the accumulated
        minibatches complete an update; the gradient norm, or None while accumulating."""
        return optimizer_step(self)

    def start_clock(self) -> None:
        """Training wall time (``state.seconds``) counts from now (after an evaluation)."""
        self._clock = time.perf_counter()

    def count_training_time(self) -> None:
        """Add the training time since the clock started to ``state.seconds``."""
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now

    @contextmanager
    def phase(self, name: str):
        """Time the block as ``time/<name>`` of the next metrics row."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    @contextmanager
    def sampling(self):
        """The rollout phase: timed, without gradients, and under the same mixed-precision autocast
        as the training pass, so re-scoring a transition reproduces its recorded log-prob (ratio 1
        on the first on-policy step with bf16 too)."""
        with self.phase("sampling"), torch.no_grad(), self.accelerator.autocast():
            yield

    def gather(self, tensor: Tensor) -> Tensor:
        return self.accelerator.gather(tensor.to(self.accelerator.device).contiguous()).cpu()
