"""``run.async_rollout``: rollouts on Ray actors that never wait for training, with bounded staleness.

``run.rollout_workers`` actors (:class:`RolloutWorker`) each hold a copy of the model and its reward. The
trainer keeps up to ``run.max_staleness`` + 1 iterations in flight: while it trains iteration i, the
workers already sample iterations i + 1 .. i + k. A version is the number of iterations trained; batch j
is sampled with the weights of version max(0, j - k), the newest the trainer has when it asks for it, so
it is at most ``max_staleness`` versions behind the weights that train on it (``train/staleness``). After
each iteration only the trainable weights (the LoRA, a few MB) go to the workers, once, through Ray's
object store. The weights of the versions that batches still in flight were asked with are kept in the
trainer's state (``history``, saved with each checkpoint), so a resumed run asks for those batches again
with the same versions and continues exactly as the run that was killed.

An iteration's inputs (its prompts, its rollout settings, its noise) depend on the run's seed and the
iteration alone, so a batch is the same whichever worker samples it and whenever: a worker that dies
is restarted by Ray (``max_restarts``) and its task is run again (``max_task_retries``), which redoes the
batch instead of losing or repeating it, and the run's sample and NFE counters stay exact. With
``max_staleness: 0`` and one worker the run is the synchronous one, bit for bit.

``ray.address`` joins an existing cluster (null: a Ray instance on this machine, or the cluster of
``RAY_ADDRESS``). Scoring runs in the worker, beside the sampler; a reward server (the ``remote``
reward) is called from there.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

#: the trainers that train on asynchronous rollouts (the others refuse run.async_rollout before loading):
#: Flow-GRPO with importance weights from its log-probs; DiffusionNFT, AWM and DGPO on older data
ASYNC_TRAINERS = ("flow_grpo", "diffusion_nft", "awm", "dgpo")


def check_async_rollout(config, adapter=None) -> None:
    """run.async_rollout's one-line refusals before anything loads: a trainer without support, several
    training processes, a reward that learns during the run, a model passed in (the workers load their own)."""
    if not config.run.async_rollout:
        return
    from align.errors import ConfigError

    learning = getattr(config, "reward_updates", False) and any(
        (spec if isinstance(spec, str) else spec.get("name")) == "adv_dino" for spec in config.rewards)
    problem = (f"{config.trainer} does not train on asynchronous rollouts yet (supported: {', '.join(ASYNC_TRAINERS)})"
               if config.trainer not in ASYNC_TRAINERS else
               "it runs in one training process" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
               "a reward that learns during the run (adv_dino) keeps its head in the trainer, the workers score "
               "with their own copy" if learning else
               "the workers load the model from model.name / model.path; a model passed in cannot be copied to them"
               if adapter is not None and not config.model.path and adapter.name != config.model.name else None)
    if problem:
        raise ConfigError(f"run.async_rollout: {problem}")


def trainable_state(adapter) -> dict[str, torch.Tensor]:
    """The trained weights by name (the LoRA, or the whole denoiser when fully fine-tuned), on the CPU:
    what a worker needs to sample with the trainer's policy."""
    return {name: p.detach().to("cpu", copy=True) for name, p in adapter.base_denoiser.named_parameters()
            if p.requires_grad}


class WorkerSession:
    """What :func:`align.trainers.scoring.sample_and_score` asks of a run, in a rollout worker: the
    model, one process, sampling without gradients."""

    def __init__(self, adapter, config) -> None:
        self.adapter, self.config, self.run_config = adapter, config, config.run
        self.latent_kwargs = {"height": config.model.height, "width": config.model.width,
                              "num_frames": config.model.num_frames}
        self.accelerator = SimpleNamespace(process_index=0, num_processes=1, device=adapter.device,
                                           autocast=nullcontext)

    @contextmanager
    def sampling(self):
        with torch.no_grad():
            yield

    def phase(self, name: str):
        return nullcontext()

    def gather(self, tensor):
        return tensor


class RolloutWorker:
    """One rollout worker (a Ray actor): the model with the run's LoRA, the trained reward, and the
    version of the weights it samples with."""

    def __init__(self, config, threads: int) -> None:
        from align.models import load_model
        from align.trainers.scoring import build_reward_set
        from align.training.model_setup import attach_lora

        torch.set_num_threads(threads)
        self.config = config
        self.adapter = load_model(config.model)
        if config.lora.enabled:  # the run's trained parameters, as align.training.model_setup makes them
            attach_lora(self.adapter, config.lora)
        else:
            self.adapter.base_denoiser.requires_grad_(True)
        self.session = WorkerSession(self.adapter, config)
        self.reward, _ = build_reward_set(config)
        self.version = -1

    def sample(self, iteration: int, batch_prompts: list, rollout_config, version: int, weights: dict) -> dict:
        """Sample and score one iteration's batch with the weights of ``version`` (loaded when newer)."""
        from align.trainers.scoring import sample_and_score

        if version != self.version:
            params = dict(self.adapter.base_denoiser.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            self.version = version
        kill_hook(iteration)
        start = time.perf_counter()
        _, result, scores, _ = sample_and_score(self.session, self.config, self.reward, batch_prompts, rollout_config,
                                                iteration)
        result.pixels = None  # the trainer does not need the decoded images (a few MB per batch)
        return {"iteration": iteration, "version": version, "result": result, "scores": scores, "pid": os.getpid(),
                "busy": (start, time.perf_counter())}


#: test hook (as the kill-and-resume tests' ALIGN_KILL_AT): a worker exits at this iteration the first
#: time (a marker file beside it records that it did), so the restart and the redone batch can be checked
KILL_ENV = "ALIGN_ROLLOUT_WORKER_EXIT_AT"


def kill_hook(iteration: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if int(at) == iteration and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


class AsyncRollouts:
    """The trainer's side: the Ray actors, the batches in flight, the weights of each version.
    ``inputs(iteration)`` gives (prompts, rollout settings) of an iteration; ``history`` is the trainer
    state's {version: weights} (checkpointed: filled and pruned in place); ``policy()`` is the context in
    which the adapter holds the weights the workers sample with (the trained weights by default; an
    EMA's swap for a trainer that samples with its EMA)."""

    def __init__(self, run, config, inputs: Callable[[int], tuple[list, Any]], history: dict,
                 policy: Callable[[], Any] = nullcontext) -> None:
        import ray

        root = str(Path(__file__).resolve().parents[2])  # the actors import the project from here
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # the workers' environment goes with the actors, so it holds in a Ray instance started before this run
        env = {"PYTHONPATH": path, **{k: v for k, v in os.environ.items() if k == KILL_ENV}}
        if not ray.is_initialized():
            ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=False)
        gpus = config.run.rollout_workers * config.run.rollout_worker_gpus
        available = ray.cluster_resources().get("GPU", 0)
        if gpus > available:  # Ray would keep the workers pending forever
            from align.errors import ConfigError

            raise ConfigError(f"run.rollout_worker_gpus: {config.run.rollout_workers} workers x "
                              f"{config.run.rollout_worker_gpus:g} GPU need {gpus:g} GPUs; the Ray cluster has "
                              f"{available:g}")
        worker = ray.remote(num_cpus=0, num_gpus=config.run.rollout_worker_gpus, max_restarts=-1,
                            max_task_retries=-1, runtime_env={"env_vars": env})(RolloutWorker)
        threads = torch.get_num_threads()
        self.ray, self.run, self.config, self.inputs = ray, run, config, inputs
        self.history, self.policy = history, policy
        self.workers = [worker.remote(config, threads) for _ in range(config.run.rollout_workers)]
        self.in_flight: deque = deque()  # (iteration, object ref), oldest first
        self.next_iteration = run.state.iteration
        self.refs: dict[int, Any] = {}  # version -> its weights in the object store

    def version_for(self, iteration: int) -> int:
        """The weights batch ``iteration`` is sampled with: version iteration - max_staleness (0 at the
        start). A resumed run without them in its history (made with a smaller max_staleness) uses its
        current weights."""
        version = max(0, iteration - self.config.run.max_staleness)
        current = self.run.state.iteration
        return version if version == current or version in self.history else current

    def weights(self, version: int):
        """The object-store reference of a version's weights (put once); the current version's are
        taken now, and kept in the history while a later request may still need them."""
        if version not in self.refs:
            if version == self.run.state.iteration:
                with self.policy():
                    state = trainable_state(self.run.adapter)
                if self.config.run.max_staleness:
                    self.history[version] = state
            else:
                state = self.history[version]
            self.refs[version] = self.ray.put(state)
        return self.refs[version]

    def take(self, iteration: int) -> dict:
        """The batch of ``iteration``: asks for the iterations up to iteration + max_staleness that are not
        asked for yet, then waits for this one."""
        last = min(iteration + self.config.run.max_staleness, self.config.iterations - 1)
        while self.next_iteration <= last:
            it = self.next_iteration
            prompts, rollout_config = self.inputs(it)
            actor = self.workers[it % len(self.workers)]
            version = self.version_for(it)
            ref = actor.sample.remote(it, prompts, rollout_config, version, self.weights(version))
            self.in_flight.append((it, ref))
            self.next_iteration += 1
        # later requests (iterations > last) use versions > last - max_staleness = iteration
        oldest_needed = iteration + 1 - self.config.run.max_staleness
        for version in [v for v in self.history if v < oldest_needed]:
            del self.history[version]
        for version in [v for v in self.refs if v < oldest_needed]:
            del self.refs[version]
        it, ref = self.in_flight.popleft()
        assert it == iteration, f"batches are consumed in order: expected {iteration}, got {it}"
        batch = self.ray.get(ref)
        batch["staleness"] = self.run.state.iteration - batch["version"]
        return batch

    def take_scored(self, iteration: int, batch_prompts: list, rollout_config) -> tuple[Any, Any, Any, int]:
        """What :func:`align.trainers.scoring.sample_and_score` gives a synchronous trainer, from the batch of
        ``iteration``: (the prompts' conditioning, encoded here for the loss; the rollout; its scores), and
        the batch's staleness."""
        done = self.take(iteration)
        with self.run.sampling():
            cond = self.run.adapter.encode(batch_prompts, self.config.negative_prompt, rollout_config.guidance_scale)
        return cond, done["result"], done["scores"], done["staleness"]

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
