"""Method sweeps: methods x rewards x settings x seeds, each trial an ordinary training run with its own
run folder and compute budget, and a report of tables and plots (``align sweep FILE``,
``align sweep report DIR``).

A sweep file (YAML, :class:`SweepConfig`)::

    out: runs/sweeps/bold                 # the sweep folder: trials/<name>/ are run folders
    max_nfe: 3200                         # every trial's budget of model evaluations
    methods: [flow_grpo, dance_grpo]      # presets in configs/methods/ (or paths to trainer configs)
    rewards: {bold: [...]}                # optional: label -> trained rewards (default: each preset's)
    settings: {optim.lr: [0.001, 0.002]}  # optional: a grid of config values
    seeds: [0, 1]
    overrides: {prompts: [...]}           # config values every trial gets
    method_overrides: {flow_grpo: {window_size: 3}}  # config values one method's trials get on top
    search:                               # optional: Optuna over continuous values instead of the grid
      trials: 8
      params: {optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}

A finished trial leaves ``trial.json`` in its folder and is not run again; a killed one continues
from its run folder's last checkpoint. Trials are claimed with a lock file, and an Optuna search
keeps its study in a journal file (``optuna.journal``), so several processes (``--workers N``, or
the same command in several shells) share one sweep, and a crashed sweep resumes.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import ConfigError, unknown_name_error

#: method presets by name (configs/methods/<name>.yaml)
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods"
#: settings a sweep sets on every trial, after the sweep's own: the budget decides when a trial ends
TRIAL_SETTINGS = {"run.log_with": "none", "run.resume": "auto", "run.progress": False, "iterations": 100000}


@dataclass
class SweepSearch:
    #: Optuna trials per method and reward (each trial trains every seed; its value is their mean)
    trials: int = 8
    #: config key -> {low, high, log} (a float), {low, high, int: true}, or {choices: [...]}
    params: dict[str, Any] = field(default_factory=dict)
    #: the metric of the final evaluation to maximise
    objective: str = "eval/reward"
    #: tpe or random
    sampler: str = "tpe"


@dataclass
class SweepConfig:
    #: the sweep folder (trials/<name>/ run folders, optuna.journal, the report)
    out: str = "runs/sweep"
    #: every trial's compute budget (model evaluations)
    max_nfe: int | None = 3200
    #: method presets (configs/methods/<name>.yaml) or paths to trainer configs
    methods: list[str] = field(default_factory=lambda: ["flow_grpo"])
    #: label -> trained rewards; null: each preset's own
    rewards: dict[str, Any] | None = None
    #: config key -> values: every combination is a trial (grid)
    settings: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    #: config values every trial gets (prompts, eval, rollout, ...)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: method -> config values its trials get on top of ``overrides`` (a field only its trainer has)
    method_overrides: dict[str, Any] = field(default_factory=dict)
    #: an evaluation every N model evaluations: the points of the reward-vs-compute curves
    eval_every_nfe: int = 800
    checkpoint_every: int = 5
    #: torch threads per trial process (null: the cores divided among the workers)
    threads: int | None = None
    #: Optuna search over continuous values (instead of the settings grid)
    search: SweepSearch | None = None


@dataclass
class Trial:
    name: str
    method: str
    reward: str | None
    settings: dict[str, Any]
    seed: int
    #: the Optuna trial it belongs to (search sweeps)
    search_trial: int | None = None


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """The sweep file with ``key=value`` overrides; unknown methods and empty lists are one-line
    ConfigErrors, raised before any trial starts."""
    from align.config import load_config

    config = load_config(SweepConfig, path, list(overrides))
    if not config.methods:
        raise ConfigError("methods is empty: name at least one method preset")
    if not config.seeds:
        raise ConfigError("seeds is empty: give at least one seed")
    for method in config.methods:
        preset_path(method)
    for method in config.method_overrides:  # a typo names no preset
        preset_path(method)
    for key, values in config.settings.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"settings.{key}: expected a non-empty list of values, got {values!r}")
    if config.search is not None:
        if not config.search.params:
            raise ConfigError("search.params is empty: name the config keys to search")
        if config.search.sampler not in SAMPLERS:
            raise unknown_name_error("search.sampler", config.search.sampler, SAMPLERS)
        for key, spec in config.search.params.items():
            distribution(key, spec)
    return config


def preset_path(method: str) -> Path:
    path = Path(method)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"methods: no config file {path}")
        return path
    if not (PRESETS / f"{method}.yaml").is_file():
        raise unknown_name_error("method preset", method, sorted(p.stem for p in PRESETS.glob("*.yaml")),
                                 field="methods")
    return PRESETS / f"{method}.yaml"


def method_name(method: str) -> str:
    return Path(method).stem


def value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_name(method: str, reward: str | None, settings: dict, seed: int, search_trial: int | None = None) -> str:
    parts = [method_name(method)] + ([reward] if reward else [])
    if search_trial is not None:
        parts.append(f"trial{search_trial}")
    else:
        parts += [f"{key.split('.')[-1]}={value_text(v)}" for key, v in settings.items()]
    return "-".join(parts + [f"seed{seed}"]).replace("/", "_")


def grid_trials(config: SweepConfig) -> list[Trial]:
    """Every combination of method, reward, setting and seed (in that order)."""
    rewards = list(config.rewards) if config.rewards else [None]
    keys = list(config.settings)
    out = []
    for method, reward, values, seed in itertools.product(config.methods, rewards,
                                                          itertools.product(*config.settings.values()), config.seeds):
        settings = dict(zip(keys, values))
        out.append(Trial(trial_name(method, reward, settings, seed), method, reward, settings, seed))
    return out


def trial_overrides(config: SweepConfig, trial: Trial, folder: Path) -> list[str]:
    """The trial's ``key=value`` layers on top of its preset: the sweep's overrides, its method's, its
    reward, its settings, then the budget, seed, evaluation points and run folder."""
    values: dict[str, Any] = dict(config.overrides)
    values.update(config.method_overrides.get(trial.method, {}))
    if trial.reward is not None:
        values["rewards"] = config.rewards[trial.reward]
    values.update(trial.settings)
    values.update(TRIAL_SETTINGS)
    values.update({"max_nfe": config.max_nfe, "run.seed": trial.seed, "run.output_dir": str(folder),
                   "run.eval_every_nfe": config.eval_every_nfe, "run.checkpoint_every": config.checkpoint_every})
    from omegaconf import OmegaConf

    return [f"{key}={json.dumps(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)}"
            for key, v in values.items()]


def trial_config(config: SweepConfig, trial: Trial, folder: Path):
    """(trainer module, validated trainer config) of a trial."""
    from align.config import load_config
    from align.trainers import resolve_trainer, trainer_module

    preset = preset_path(trial.method)
    overrides = trial_overrides(config, trial, folder)
    module = trainer_module(resolve_trainer(None, str(preset), overrides))
    return module, load_config(module.CONFIG, preset, overrides)


# --- claiming trials (several processes share a sweep) --------------------------------------------------------

def claim(folder: Path) -> bool:
    """Take the trial in ``folder`` for this process: an atomic lock file naming host and pid; a lock of
    a process of this host that is gone is stale and taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "claim.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                return False
            if host != socket.gethostname() or process_alive(int(pid)):
                return False
            lock.unlink(missing_ok=True)  # its process died: the trial continues from its checkpoint
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release(folder: Path) -> None:
    (folder / "claim.lock").unlink(missing_ok=True)


def finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "trial.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def run_trial(config: SweepConfig, trial: Trial, folder: Path) -> dict:
    """Train one trial in its run folder (continuing its checkpoint if a previous attempt was
    killed) and write ``trial.json`` atomically: what it was and how it ended."""
    module, trainer_config = trial_config(config, trial, folder)
    info = {"name": trial.name, "method": method_name(trial.method), "trainer": trainer_config.trainer,
            "reward": trial.reward, "settings": trial.settings, "seed": trial.seed, "search_trial": trial.search_trial}
    try:
        summary = module.train(trainer_config)
        info.update(status="complete", summary={k: float(v) for k, v in summary.items()})
    except (ConfigError, RuntimeError, ValueError) as err:  # a failed trial is reported, the sweep goes on
        info.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
    tmp = folder / "trial.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(folder / "trial.json")
    return info


def run_grid(config: SweepConfig, out: Path) -> None:
    for trial in grid_trials(config):
        folder = out / "trials" / trial.name
        if finished(folder):
            print(f"sweep: {trial.name} finished before, skipped", flush=True)
            continue
        if not claim(folder):
            print(f"sweep: {trial.name} is running in another process", flush=True)
            continue
        try:
            print(f"sweep: {trial.name}", flush=True)
            info = run_trial(config, trial, folder)
            if info["status"] != "complete":
                print(f"sweep: {trial.name} failed: {info['error']}", flush=True)
        finally:
            release(folder)


# --- Optuna search ----------------------------------------------------------------------------------------------

SAMPLERS = ("tpe", "random")


def distribution(key: str, spec: Any):
    import optuna

    if not isinstance(spec, dict):
        raise ConfigError(f"search.params.{key}: expected {{low, high}} or {{choices}}, got {spec!r}")
    if "choices" in spec:
        return optuna.distributions.CategoricalDistribution(list(spec["choices"]))
    if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
        raise ConfigError(f"search.params.{key}: needs low < high, got {spec!r}")
    if spec.get("int"):
        return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
    return optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))


#: the index of a ``--workers`` process (0 for a sweep run alone)
WORKER_ENV = "ALIGN_SWEEP_WORKER"


def study_sampler(kind: str, trials_so_far: int, worker: int):
    """The Optuna sampler of one process of a search. Processes sharing a study must not draw the same
    points: each seeds its sampler with the study's trial count when it joins plus its worker index (a
    lone sweep from scratch: seed 0, reproducible), and TPE counts the trials other processes are
    still running as lies (``constant_liar``), so it does not ask for their points again."""
    import optuna

    seed = trials_so_far + worker
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def run_search(config: SweepConfig, out: Path) -> None:
    """Per method and reward, an Optuna study in the journal ``out/optuna.journal``: ask a point, train
    every seed at it, tell the mean objective. A trial left running by a process that died is
    trained again at its point (its run folders continue their checkpoints) and told."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    search = config.search
    distributions = {key: distribution(key, spec) for key, spec in search.params.items()}
    host = socket.gethostname()
    for method, reward in itertools.product(config.methods, list(config.rewards) if config.rewards else [None]):
        name = "-".join([method_name(method)] + ([reward] if reward else []))
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
        study.sampler = study_sampler(search.sampler, len(study.get_trials(deepcopy=False)),
                                      int(os.environ.get(WORKER_ENV, "0")))
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            attrs = stale.user_attrs
            if attrs.get("host") == host and not process_alive(int(attrs.get("pid", 0))):
                print(f"sweep: {name} trial {stale.number} was left running by a process that died: resumed", flush=True)
                study.tell(stale.number, search_value(config, out, method, reward, stale.number, stale.params))
        while sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
                  for t in study.get_trials(deepcopy=False)) < search.trials:
            trial = study.ask(distributions)
            trial.set_user_attr("host", host)
            trial.set_user_attr("pid", os.getpid())
            study.tell(trial, search_value(config, out, method, reward, trial.number, trial.params))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = max(complete, key=lambda t: t.value)
            print(f"sweep: {name} best {search.objective}={best.value:.4f} at {best.params}", flush=True)


def search_value(config: SweepConfig, out: Path, method: str, reward: str | None, number: int, params: dict) -> float:
    values = []
    for seed in config.seeds:
        trial = Trial(trial_name(method, reward, params, seed, number), method, reward, dict(params), seed, number)
        folder = out / "trials" / trial.name
        if not finished(folder):
            claim(folder)
            print(f"sweep: {trial.name} {params}", flush=True)
            try:
                run_trial(config, trial, folder)
            finally:
                release(folder)
        info = json.loads((folder / "trial.json").read_text())
        if info["status"] == "complete":
            values.append(info["summary"].get(config.search.objective, float("nan")))
    return sum(values) / len(values) if values else float("nan")


# --- the command ------------------------------------------------------------------------------------------------

def check_trials(config: SweepConfig, out: Path) -> None:
    """Every trial still to run is a valid trainer config (its trainer's whole check_config), so a typo
    in a preset, a reward or a setting stops the sweep before its first trial; a search checks its
    presets with the sweep's overrides (the searched values are drawn later, in their ranges)."""
    if config.search is not None:
        trials = [Trial(trial_name(m, r, {}, config.seeds[0], 0), m, r, {}, config.seeds[0], 0)
                  for m in config.methods for r in (list(config.rewards) if config.rewards else [None])]
    else:
        trials = grid_trials(config)
    for trial in trials:
        folder = out / "trials" / trial.name
        if not finished(folder):
            module, trainer_config = trial_config(config, trial, folder)
            module.check_config(trainer_config)


def run_sweep(path: str | Path, overrides: list[str] = (), workers: int = 1) -> Path:
    """Run (or continue) a sweep and write its report; ``workers`` > 1 runs that many processes of
    the same sweep and waits for them."""
    config = load_sweep(path, overrides)
    out = Path(config.out)
    check_trials(config, out)
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        threads = config.threads or max(1, (os.cpu_count() or 1) // workers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "align", "sweep", str(path), "--no-report", *overrides]
        procs = []
        for worker in range(workers):
            procs.append(subprocess.Popen(command, env={**env, WORKER_ENV: str(worker)}))
            time.sleep(2)  # staggered, so the first claims differ
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"sweep: a worker exited with {max(codes)}")
    else:
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        (run_search if config.search is not None else run_grid)(config, out)
    return out


def main_sweep(args) -> int:
    from align.commands.sweep_report import write_report

    if args.target[0] == "report":
        if len(args.target) != 2:
            raise ConfigError("align sweep report DIR: give the sweep folder")
        paths = write_report(Path(args.target[1]))
    else:
        if len(args.target) != 1:
            raise ConfigError(f"align sweep FILE: one sweep file, got {' '.join(args.target)}")
        out = run_sweep(args.target[0], list(args.overrides), workers=args.workers)
        if args.no_report:
            return 0
        paths = write_report(out)
    for path in paths:
        print(f"wrote {path}")
    return 0
