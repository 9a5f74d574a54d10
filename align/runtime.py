"""What every trainer shares: accelerate set-up, LoRA / full fine-tuning, optimizer, prompts,
atomic checkpoints with resume, trackers, evaluation on fixed prompts and seeds, sample grids,
metrics, and LoRA export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from align.config import ConfigError, check_choice, flat_settings, save_config, to_dict
from align.errors import unknown_name_error
from align.sample import ModelConfig, load_model, resolve_device
from align.sampling.rollout import RolloutConfig

TOY_PROMPTS = [f"a {c} digit {d}" for d in range(10) for c in ("red", "green", "blue", "yellow")]
TOY_EVAL_PROMPTS = ["a red digit 3", "a blue digit 5", "a green digit 8", "a yellow digit 1"]


@dataclass
class LoraSettings:
    #: false: full fine-tuning of the denoiser (the reference is then a frozen copy)
    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    #: module names to adapt (null: the adapter's attention projections)
    target_modules: list[str] | None = None


@dataclass
class OptimConfig:
    #: the optimizer, by name (OPTIMIZERS): "adamw" (torch), or "adamw8bit" (bitsandbytes: both moments
    #: in 8 bits, block-wise quantised, 2 bytes per trained parameter instead of 8; tensors under 4096
    #: elements keep 32-bit moments)
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    #: exponential moving average of the trained weights (null: off), e.g. 0.99; evaluation and the
    #: LoRA export use it (the Flow-GRPO reference: 0.9, every 8 updates)
    ema_decay: float | None = None
    #: update the EMA every this many optimizer updates
    ema_every: int = 1


def adamw(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW with fp32 moments."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def adamw8bit(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: the same update with both moments stored block-wise in 8 bits."""
    bitsandbytes = import_bitsandbytes()
    return bitsandbytes.optim.AdamW8bit(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                        weight_decay=optim.weight_decay)


#: optim.name -> builder(trainable parameters, OptimConfig)
OPTIMIZERS = {"adamw": adamw, "adamw8bit": adamw8bit}


def import_bitsandbytes():
    """bitsandbytes, or a one-line ConfigError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optim.name adamw8bit needs bitsandbytes: pip install 'align-diffusion[bnb]'") from None
    return bitsandbytes


def check_optimizer(optim: OptimConfig) -> None:
    """Unknown optimizer names and a missing bitsandbytes fail here, before any model loads."""
    if optim.name not in OPTIMIZERS:
        raise unknown_name_error("optimizer", optim.name, OPTIMIZERS, field="optim.name")
    if optim.name == "adamw8bit":
        import_bitsandbytes()


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    check_optimizer(optim)
    return OPTIMIZERS[optim.name](params, optim)


MIXED_PRECISION = ("no", "bf16", "fp16", "fp8")
TRACKERS = ("tensorboard", "wandb", "none")
#: updates in a row with a NaN / inf gradient before a run stops
MAX_BAD_UPDATES = 3


class TrainingError(RuntimeError):
    """A run cannot go on (it diverged); one line."""


@dataclass
class RunConfig:
    #: the run folder (null: a fresh ``runs/<trainer>-<date>-<time>`` per run)
    output_dir: str | None = None
    seed: int = 0
    #: auto: continue output_dir's newest checkpoint when the run there has the same settings (a
    #: changed setting or another trainer is refused); latest: as auto, and with a null output_dir
    #: the newest runs/<trainer>-* folder; a checkpoint folder: continue from it with this config's
    #: settings; null: start over (align/run_folder.py)
    resume: str | None = "auto"
    checkpoint_every: int = 10
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
    progress: bool = True
    #: roll an iteration's prompts out in this many chunks, each decoded and scored while the next
    #: samples (align/sampling/overlap.py; topologies without splits or branches); 1: one piece
    rollout_chunks: int = 1
    #: score chunk k in a worker thread while chunk k + 1 samples (false: score it first; the same results)
    overlap_scoring: bool = True
    #: stop the run when more than this fraction of an iteration's samples is unscored (the
    #: reward's valid flag: a server down, OCR with no text); below it they are dropped and counted
    max_unscored_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.mixed_precision in (False, "False", "false"):  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        check_choice("run.mixed_precision", self.mixed_precision, MIXED_PRECISION, "precision")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"run.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        check_choice("run.log_with", self.log_with, TRACKERS, "tracker")
        if not 0 <= self.max_unscored_fraction <= 1:
            raise ConfigError(f"run.max_unscored_fraction must be in [0, 1], got {self.max_unscored_fraction}")


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


def prompts_for_iteration(prompts: Sequence[str], count: int, seed: int, iteration: int,
                          process_index: int = 0, num_processes: int = 1) -> list[str]:
    """A deterministic draw per (seed, iteration): a resumed run sees the same prompts; each
    process takes its own slice."""
    rng = random.Random(f"{seed}-{iteration}")
    total = count * num_processes
    chosen = rng.sample(list(prompts), total) if total <= len(prompts) else rng.choices(list(prompts), k=total)
    return chosen[process_index * count:(process_index + 1) * count]


def iteration_generator(seed: int, iteration: int, process_index: int = 0, stream: str = "") -> torch.Generator:
    """The generator of one (seed, iteration, process): the rollout's by default; another ``stream``
    (e.g. "train") gives an independent one, so training noise never replays the rollout's."""
    import zlib

    # ints only: hash() of a str changes from process to process (PYTHONHASHSEED)
    key = (seed, iteration, process_index) if not stream else (seed, iteration, process_index,
                                                                zlib.crc32(stream.encode()))
    return torch.Generator().manual_seed(hash(key) % (2**63))


#: full fine-tuning of one expert on sharded weights: the frozen expert is shared by the live model
#: and the reference copy, and its weights are shards whenever the live root is not running
SHARDED_EXPERT_ERROR = ("model.train_experts: full fine-tuning of one expert (lora.enabled=false) is not supported "
                        "on sharded weights (run.fully_shard, FSDP): the reference shares the frozen expert's shards; "
                        "train a LoRA, or both experts")


class Run:
    """The training session of one trainer: model, optimizer, accelerator, run folder."""

    def __init__(self, config: Any, *, model: ModelConfig, lora: LoraSettings, optim: OptimConfig,
                 run: RunConfig, adapter=None, trainer_state=None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        if model.lora is not None:
            raise ConfigError("model.lora loads a LoRA for sampling; to go on training a run, use run.resume")
        self.config, self.run_config = config, run
        #: image / video size of every rollout of the run (null: the model's default)
        self.latent_kwargs = {"height": model.height, "width": model.width, "num_frames": model.num_frames}
        self.dir = Path(run.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        cpu = resolve_device(model.device).type == "cpu"
        # accelerate keeps one process-wide state and refuses a second Accelerator with other
        # settings (bf16 after fp32); a process may run several trainings (sweeps, notebooks, tests),
        # so each run starts from a clean one. The distributed setup (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision, cpu=cpu,
            gradient_accumulation_steps=run.gradient_accumulation_steps,
            log_with=None if run.log_with == "none" else run.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.dir), logging_dir=str(self.dir / "logs")))
        set_seed(run.seed)
        if adapter is None:
            adapter = load_model(model)  # sets the configured size as the adapter's default
        else:  # the configured size is the adapter's default (FLUX reads its packed latents' grid from it)
            adapter.default_height = model.height or adapter.default_height
            adapter.default_width = model.width or adapter.default_width
        self.adapter = adapter
        self.adapter.denoiser.to(self.accelerator.device)
        self._setup_parameters(lora)
        if run.compile:
            from align.compile import compile_denoiser

            compile_denoiser(self.adapter, **run.compile_options)
        from accelerate.utils import DistributedType

        # accelerate's FSDP plugin (GPUs) shards in prepare itself
        shard_here = (run.fully_shard and self.accelerator.num_processes > 1
                      and self.accelerator.distributed_type != DistributedType.FSDP)
        if shard_here:
            from align.sharding import shard_denoiser

            self.log_text(f"fully_shard: {shard_denoiser(self.adapter)} modules sharded over "
                          f"{self.accelerator.num_processes} processes (FSDP2)")
        params = self.adapter.trainable_parameters()  # after sharding: the sharded parameters
        if not params:
            raise ConfigError("nothing to train: no trainable parameter after the LoRA / fine-tune set-up")
        self.optimizer = build_optimizer(params, optim)
        self.optim_config = optim
        if shard_here:  # fully_shard synchronises gradients itself: no DDP wrapper
            self.optimizer = self.accelerator.prepare(self.optimizer)
        else:
            self.adapter.denoiser, self.optimizer = self.accelerator.prepare(self.adapter.denoiser, self.optimizer)
        from align.sharding import has_sharded

        #: the weights are DTensors (run.fully_shard, or accelerate's FSDP2): saving gathers on every process
        self.sharded = has_sharded(self.adapter.base_denoiser.parameters())
        if self.sharded and not lora.enabled and getattr(model, "train_experts", "both") != "both":
            raise ConfigError(SHARDED_EXPERT_ERROR)
        self.ema = None
        if optim.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=optim.ema_decay)
        self.state = TrainState(trainer=trainer_state)
        if self.is_main:
            if run.log_with != "none":
                flat = {k: str(v) for k, v in flat_settings(to_dict(config)).items()}
                self.accelerator.init_trackers("align", config=flat)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.phase_seconds: dict[str, float] = {}
        self._bad_updates = 0
        #: when the training time now running began (evaluations do not count)
        self._clock = time.perf_counter()

    # --- set-up ---------------------------------------------------------------------------------
    def _setup_parameters(self, lora: LoraSettings) -> None:
        base = self.adapter.base_denoiser
        experts = getattr(getattr(self.config, "model", None), "train_experts", "both")
        if experts != "both":  # an adapter passed in takes the config's choice of experts
            if not hasattr(self.adapter, "train_experts"):
                raise ConfigError(f"model.train_experts: the {self.adapter.name!r} model has one denoiser; "
                                  f"train_experts applies to Wan 2.2 A14B (wan22)")
            try:
                self.adapter.train_experts = experts
            except ValueError as err:
                raise ConfigError(f"model.train_experts: {err}") from None
        scale_2 = getattr(getattr(self.config, "model", None), "guidance_scale_2", None)
        if scale_2 is not None:  # an adapter passed in takes the config's low-noise CFG scale too
            self.adapter.guidance_scale_2 = scale_2
        if lora.enabled:
            base.requires_grad_(False)
            try:
                self.adapter.add_lora(lora.rank, lora.alpha, lora.target_modules)
            except ValueError as err:  # peft: no module matches a target name
                layers = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                                 if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                                 and not name.rsplit(".", 1)[-1].isdigit()})
                raise ConfigError(f"lora.target_modules {lora.target_modules}: {str(err).splitlines()[0]} "
                                  f"(layer names in this model: {', '.join(layers[:20])})") from None
            for param in base.parameters():  # peft leaves only LoRA weights trainable
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            self.adapter.keep_reference_copy()
            base.requires_grad_(False)
            for module in self.adapter.fine_tune_modules():  # the whole denoiser, or the chosen experts
                module.requires_grad_(True)
        if self.adapter.forward_may_skip_trainables() and self.accelerator.num_processes > 1:
            # one call runs one expert: DDP must not wait for the gradients of the others
            from accelerate.utils import DistributedDataParallelKwargs

            handler = self.accelerator.ddp_handler or DistributedDataParallelKwargs()
            handler.find_unused_parameters = True
            self.accelerator.ddp_handler = handler
        if self.run_config.gradient_checkpointing:
            if not getattr(base, "_supports_gradient_checkpointing", False):
                raise ConfigError(f"run.gradient_checkpointing: {type(base).__name__} does not support it")
            base.enable_gradient_checkpointing()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ----------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        folder = self.dir / "checkpoints"
        return sorted(folder.glob("iteration-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []

    def trainable_state(self) -> dict[str, Tensor]:
        """The trainable weights only (LoRA: a few MB instead of the whole model), whole tensors
        (sharded: gathered, so every process must call it)."""
        from align.sharding import full_tensors

        model = self.accelerator.unwrap_model(self.adapter.denoiser)
        return {n: full_tensors(p.detach()).cpu().contiguous() for n, p in model.named_parameters()
                if p.requires_grad}

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with whole tensors (sharded: gathered on every process)."""
        from align.sharding import full_tensors

        return full_tensors(self.optimizer.state_dict())

    def export_lora(self, directory: Path) -> None:
        """The trained LoRA written by the main process (sharded: gathered on every process first)."""
        from align.sharding import full_tensors

        state = full_tensors(self.adapter.lora_state()) if self.sharded else None
        if self.is_main:
            self.adapter.export_lora(directory, state=state)

    def save_checkpoint(self) -> Path:
        """Trainable weights, optimizer, run state and EMA as safetensors + JSON (no pickle; see
        align/checkpoints.py), written to a temporary folder and renamed when complete: a kill
        mid-write leaves the previous checkpoint intact."""
        from align.checkpoints import write_checkpoint

        folder = self.dir / "checkpoints"
        final = folder / f"iteration-{self.state.iteration:06d}"
        tmp = folder / f".tmp-{final.name}"
        self.accelerator.wait_for_everyone()
        if self.is_main or self.sharded:  # sharded: every process takes part in the gathers
            trainable, optimizer = self.trainable_state(), self.optimizer_state()
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            parts = {"trainable": trainable, "optimizer": optimizer,
                     "state": {**self.state.state_dict(), "accelerator_step": int(self.accelerator.step)}}
            if self.ema is not None:
                parts["ema"] = self.ema.state_dict()
            write_checkpoint(tmp, parts)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[:-max(1, self.run_config.checkpoint_limit)]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def maybe_resume(self) -> bool:
        """``run.resume`` (see align/run_folder.py): "auto" / "latest" take the newest intact
        checkpoint of the run folder (a newer one with a missing or truncated file is skipped, with
        a one-line warning), a path that checkpoint; null starts over (the folder's old checkpoints
        and metrics go). Whatever is not resumed starts with an empty metrics.jsonl."""
        from align.checkpoints import checkpoint_problem
        from align.run_folder import continues_a_run

        resume = self.run_config.resume
        path = None
        if continues_a_run(resume):
            for candidate in reversed(self.checkpoints()):
                problem = checkpoint_problem(candidate)
                if problem is None:
                    path = candidate
                    break
                message = f"checkpoint {candidate} is unusable ({problem}): trying the one before"
                warnings.warn(message, stacklevel=2)
                self.log_text(message)
        elif resume:
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"run.resume: checkpoint folder not found: {path}")
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ConfigError(f"run.resume: checkpoint {path} is unusable: {problem}")
        if path is None:
            if not resume and self.is_main:
                for old in self.checkpoints():
                    shutil.rmtree(old)
            self._drop_metrics_after(-1)
            return False
        self.load_checkpoint(path)
        self._drop_metrics_after(self.state.iteration)
        message = f"resuming {self.dir} at iteration {self.state.iteration} (from {path.name})"
        self.log_text(message)
        if self.is_main and self.run_config.progress:
            print(message, flush=True)
        return True

    def describe(self) -> None:
        """Write config.yaml and run.json: called once the run has started (resumed or not), so a
        start that fails never overwrites the folder's saved config."""
        if self.is_main:
            save_config(self.config, self.dir / "config.yaml")
            describe_run_folder(self.dir, self.config)

    def _drop_metrics_after(self, iteration: int) -> None:
        """A resumed run redoes the iterations after its checkpoint: their old metrics rows go, so
        metrics.jsonl never holds an iteration twice."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def load_checkpoint(self, path: Path) -> None:
        from align.checkpoints import has_part, read_part

        trainable = read_part(path, "trainable")
        expected = self.trainable_state()
        if set(trainable) != set(expected) or any(trainable[k].shape != expected[k].shape for k in expected):
            differ = sorted(set(expected) ^ set(trainable))[:1] or [k for k in expected
                                                                    if trainable[k].shape != expected[k].shape][:1]
            raise ConfigError(f"checkpoint {path} does not match the model's trainable weights (first difference: "
                              f"{differ[0]}); was it made with other LoRA settings (lora.rank, lora.target_modules)?")
        from align.sharding import shard_like

        model = self.accelerator.unwrap_model(self.adapter.denoiser)
        if self.sharded:  # each process keeps its shard of the whole tensors
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in trainable:
                        param.copy_(shard_like(trainable[name].to(expected[name].dtype), param))
        else:
            model.load_state_dict({k: v.to(expected[k].dtype) for k, v in trainable.items()}, strict=False)
        optimizer = read_part(path, "optimizer")
        optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}
        if self.sharded:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer["state"] = {i: {k: shard_like(v, params[i]) for k, v in values.items()}
                                  for i, values in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)
        state = read_part(path, "state")
        self.accelerator.step = int(state.pop("accelerator_step", 0))
        self.state.load_state_dict(state)
        if self.ema is not None and has_part(path, "ema"):
            self.ema.load_state_dict(read_part(path, "ema"))

    # --- training helpers -----------------------------------------------------------------------
    def accumulate(self):
        """Wraps one minibatch's forward and backward passes: accelerate counts it toward
        ``gradient_accumulation_steps`` (``accelerator.backward`` divides each loss by that count)
        and skips the DDP gradient all-reduce until the minibatch that completes an update."""
        return self.accelerator.accumulate(self.adapter.denoiser)

    def optimizer_step(self) -> float | None:
        """Clip, step, zero once the accumulated minibatches complete an update; returns the gradient
        norm (before clipping), or None while gradients are still being accumulated.

        An update whose gradient is NaN / inf is skipped (one bad batch must not poison the
        weights) and counted in ``state.skipped_updates``; ``MAX_BAD_UPDATES`` in a row stop
        the run with a TrainingError. (fp16 runs leave this to accelerate's gradient scaler.)"""
        if not self.accelerator.sync_gradients:
            return None
        params = self.adapter.trainable_parameters()
        norm = float(self.accelerator.clip_grad_norm_(params, self.optim_config.max_grad_norm or math.inf))
        if not math.isfinite(norm) and self.accelerator.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_updates += 1
            self._bad_updates += 1
            if self._bad_updates >= MAX_BAD_UPDATES:
                raise TrainingError(f"non-finite gradients in {self._bad_updates} updates in a row at iteration "
                                    f"{self.state.iteration + 1}: the run diverged (lower optim.lr, check the "
                                    f"rewards); the last checkpoint is intact")
            warnings.warn(f"non-finite gradient norm at iteration {self.state.iteration + 1}: update skipped",
                          stacklevel=2)
            return norm
        self._bad_updates = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.updates += 1
        if self.ema is not None and self.state.updates % self.optim_config.ema_every == 0:
            self.ema.step(params)
        return norm

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

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({f"time/{k}": v for k, v in self.phase_seconds.items()})
        self.phase_seconds = {}
        if self.run_config.log_with != "none":
            self.accelerator.log(metrics, step=step)
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"iteration": step, **metrics}) + "\n")

    def log_text(self, text: str) -> None:
        if self.is_main:
            with open(self.dir / "log.txt", "a") as f:
                f.write(text + "\n")

    @contextmanager
    def ema_weights(self):
        """Evaluate with the EMA weights when EMA is on."""
        if self.ema is None:
            yield
            return
        params = self.adapter.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, reward, prompts: Sequence[str], rollout_config: RolloutConfig, eval_config, *,
                 negative_prompt: str = "", heldout: dict | None = None,
                 grid_name: str | None = None) -> dict[str, float]:
        """:func:`align.evaluation.evaluate` with the run's weights (the EMA when on) and autocast;
        writes the sample grid ``samples/<grid_name>``."""
        from align.evaluation import evaluate

        with self.ema_weights(), self.accelerator.autocast():
            metrics, pixels, sample_prompts = evaluate(self.adapter, reward, prompts, eval_config, rollout_config,
                                                       negative_prompt=negative_prompt, heldout=heldout,
                                                       latent_kwargs=self.latent_kwargs)
        if grid_name and self.is_main:
            from align.sample import write_samples

            write_samples(pixels.cpu(), sample_prompts, self.dir / "samples" / grid_name,
                          columns=eval_config.per_prompt)
        return metrics


def describe_run_folder(directory: Path, config: Any) -> Path:
    """``run.json``: what a run folder holds, so ``align`` commands, the demo and sweeps can read
    any run: the trainer, the package version, the resolved config, metrics, checkpoints, grids
    and the LoRA export (written atomically; the config file is ``config.yaml`` beside it)."""
    from importlib import metadata

    try:
        version = metadata.version("align-diffusion")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = "unknown"
    info = {"trainer": getattr(config, "trainer", None), "version": version, "config": "config.yaml",
            "metrics": "metrics.jsonl", "checkpoints": "checkpoints", "samples": "samples", "lora": "lora",
            "log": "log.txt", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = directory / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return path
