"""The ``align`` command.

    align sample --model toy --prompt "a red digit 7" --num 8 --out samples/ [key=value ...]
    align sample --prompt "a red digit 7" --guide stroke_thickness=300      (reward guidance)
    align search --prompt "a red digit 7" --reward digit --num 32           (test-time search)
    align train flow_grpo --config configs/quickstart.yaml [key=value ...]
    align train --config configs/methods/flow_grpo.yaml      (a method preset names its trainer)
    align launch multi_gpu train flow_grpo --config ...     (accelerate launch with a shipped preset)
    align sweep configs/sweeps/methods.yaml [--workers 2]    (methods x rewards x settings x seeds)
    align sweep report runs/sweeps/methods                   (its tables and plots again)
    align eval runs/quickstart                              (before / after table of a run)
    align demo [--port 7860]                                (the Gradio demo)
    align env
    align models

Every command takes ``--config FILE.yaml`` and trailing ``key=value`` overrides (OmegaConf dot-list,
e.g. ``rollout.num_steps=20 rollout.split_steps=[0,3,6]``). Config errors are one line, printed
before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.config import ConfigError, load_config
from align.trainers import resolve_trainer  # noqa: F401 - the command's trainer, re-exported


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    from align.commands.sample import SampleConfig, check_sample_config, generate
    from align.models import load_model
    from align.media import write_samples

    overrides = _flag_overrides(args, {
        "model": "model.name", "model_path": "model.path", "num": "num_per_prompt", "out": "out",
        "steps": "rollout.num_steps", "guidance": "rollout.guidance_scale", "seed": "seed",
        "device": "model.device", "dtype": "model.dtype", "lora": "model.lora"})
    config = load_config(SampleConfig, args.config, overrides + list(args.overrides))
    if args.prompt:
        config.prompts = list(args.prompt)
    if args.image:
        config.images = list(args.image)
    if args.guide:
        config.guidance.rewards = guide_specs(args.guide)
    check_sample_config(config)
    adapter = load_model(config.model)
    pixels, prompts, result = generate(adapter, config)
    per_prompt = len(prompts) // len(set(result.prompt_index.tolist()))  # a tree yields several leaves per root
    grid = write_samples(pixels, prompts, config.out, columns=per_prompt, fps=config.fps)
    cost = result.guidance_cost
    extra = "" if cost is None else f", guidance reward_calls={cost['reward_calls']}"
    print(f"wrote {len(prompts)} samples and {grid} (nfe={result.nfe}{extra})")
    return 0


def guide_specs(texts: list[str]) -> list[dict]:
    """``--guide`` values -> guidance reward specs: ``NAME=WEIGHT`` weighs a reward's total;
    ``NAME.DIMENSION=WEIGHT`` guides by that dimension only (several of one reward merge into one
    spec, its other dimensions at weight 0)."""
    specs: dict[str, dict] = {}
    for text in texts:
        name, sep, weight = text.partition("=")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"--guide {text!r}: the weight {weight!r} is not a number (NAME=WEIGHT)") from None
        name, dot, dimension = name.partition(".")
        if dot:
            spec = specs.setdefault(f"{name}.dims", {"name": name, "key": name, "weights": {"*": 0.0}})
            spec["weights"][dimension] = value
        else:
            specs[name] = {"name": name, "weight": value}
    return list(specs.values())


def cmd_search(args: argparse.Namespace) -> int:
    """``align search``: best-of-N or pruned (TTSnap) search over start noises (align/commands/search.py)."""
    from align.models import check_device, check_model_source, load_model
    from align.commands.search import SearchConfig, search, write_search
    from align.prompts import needs_images
    from pipelines.registry import check_adapter_name, model_tasks

    overrides = _flag_overrides(args, {
        "model": "model.name", "model_path": "model.path", "num": "num_candidates", "out": "out",
        "steps": "rollout.num_steps", "seed": "seed", "device": "model.device", "method": "method",
        "lora": "model.lora", "top_k": "top_k"})
    config = load_config(SearchConfig, args.config, overrides + list(args.overrides))
    if args.prompt:
        config.prompts = list(args.prompt)
    if args.reward:
        config.rewards = list(args.reward)
    config.validate()
    check_adapter_name(config.model.name)
    check_device(config.model.device)
    check_model_source(config.model)
    if needs_images(model_tasks(config.model.name, config.model.path)):
        raise ConfigError(f"model.name: the {config.model.name!r} model takes an image with every prompt; align "
                          f"search takes text prompts only")
    from align.training.run_folder import check_writable_folder

    check_writable_folder(Path(config.out), "--out")
    adapter = load_model(config.model)
    result = search(adapter, config)
    grid = write_search(result, config.prompts, config.out)
    print(result.account())
    for p, prompt in enumerate(config.prompts):
        scores = " ".join(f"{float(s):.4f}" for s in result.best_scores[p])
        print(f"{prompt}: best {scores}")
    print(f"wrote {result.best.shape[0] * result.best.shape[1]} samples, {Path(config.out) / 'scores.tsv'} and {grid}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """``align label``: pairs for a person to judge (align/commands/label.py), before D3PO trains on them."""
    from align.commands.label import write_label_set
    from align.training.run_folder import check_writable_folder
    from align.prompts import check_prompt_images, prompt_list
    from align.training.run import TOY_PROMPTS
    from align.models import check_device, check_model_source, load_model
    from align.trainers import trainer_module
    from pipelines.registry import model_tasks
    from align.trainers.checks import require_stochastic_kernel
    from pipelines.registry import check_adapter_name

    module = trainer_module("d3po")
    config = load_config(module.CONFIG, args.config, [o for o in args.overrides if not o.startswith("trainer=")])
    if config.model.lora is not None:  # D3PO trains a fresh LoRA from the base model that sampled the pairs
        raise ConfigError("model.lora: align label samples with the base model D3PO starts from; drop model.lora")
    if args.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {args.pairs}")
    check_adapter_name(config.model.name)
    config.rollout.validate()
    require_stochastic_kernel(config.rollout)
    check_device(config.model.device)
    check_model_source(config.model)
    check_prompt_images(prompt_list(config.prompts, config.prompt_file, TOY_PROMPTS), config.model.name,
                        model_tasks(config.model.name, config.model.path))
    out = Path(args.out)
    check_writable_folder(out, "--out")
    adapter = load_model(config.model)
    write_label_set(adapter, config, out, args.pairs)
    print(f"wrote {args.pairs} pairs to {out}: open {out / 'index.html'}, choose, save pairs.jsonl there, then "
          f"align train d3po --config ... labels={out / 'pairs.jsonl'} (or align train dpo pairs={out / 'pairs.jsonl'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from align.trainers import trainer_module

    module = trainer_module(resolve_trainer(args.method, args.config, args.overrides))
    config = load_config(module.CONFIG, args.config, list(args.overrides))
    module.check_config(config)  # every name and value, before any model loads
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(config)), end="")
        return 0
    try:
        module.train(config)
    except KeyboardInterrupt:
        print(f"align: interrupted: {resume_hint(Path(config.run.output_dir), config.run.resume)}", file=sys.stderr)
        return 130
    return 0


def resume_hint(folder: Path, resume: str | None) -> str:
    """Where an interrupted run stands and how to continue it (one line)."""
    from align.training.run_folder import continues_a_run

    checkpoints = sorted((folder / "checkpoints").glob("iteration-*")) if (folder / "checkpoints").is_dir() else []
    if not checkpoints:
        return f"no checkpoint was written in {folder} yet (the same command starts over)"
    settings = f"run.output_dir={folder}" + ("" if continues_a_run(resume) else " run.resume=auto")
    return f"the last checkpoint is {checkpoints[-1]}; the same command with {settings} continues from it"


def cmd_launch(args: argparse.Namespace) -> int:
    """``align launch PRESET train ...``: the command under ``accelerate launch`` with a shipped
    preset. The preset name and the training config are checked here, before any process starts."""
    import os
    import subprocess

    from align.commands.parsers import ACCELERATE_PRESETS, accelerate_presets
    from align.errors import unknown_name_error

    if args.preset not in accelerate_presets():
        raise unknown_name_error("accelerate preset", args.preset, accelerate_presets(), field="launch")
    command = list(args.command) + list(getattr(args, "overrides", []) or [])
    if not command:
        raise ConfigError("launch: give the command to run, e.g. align launch multi_gpu train flow_grpo --config ...")
    commands = build_parser().command_choices
    if command[0] not in commands:
        raise unknown_name_error("command", command[0], commands, field="launch")
    if command[0] == "train":  # validate the whole config in this process first
        train_args, extra = build_parser().parse_known_args(command)
        if "=" in (train_args.method or ""):  # no method named, only overrides
            train_args.overrides, train_args.method = [train_args.method, *train_args.overrides], None
        module_name = resolve_trainer(train_args.method, train_args.config, list(train_args.overrides) + extra)
        from align.trainers import trainer_module

        module = trainer_module(module_name)
        config = load_config(module.CONFIG, train_args.config, list(train_args.overrides) + extra)
        module.check_config(config)
        # every process must write the one folder chosen here (a null run.output_dir is a timestamp)
        command.append(f"run.output_dir={config.run.output_dir}")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ACCELERATE_PRESETS / f"{args.preset}.yaml"), "-m", "align", *command]
    if args.dry_run:
        print(" ".join(launch))
        return 0
    return subprocess.call(launch, env=os.environ.copy())


def cmd_sweep(args: argparse.Namespace) -> int:
    from align.commands.sweep import main_sweep

    targets = [t for t in args.target if "=" not in t]  # key=value words are overrides
    args.overrides = [t for t in args.target if "=" in t] + list(args.overrides)
    args.target = targets
    return main_sweep(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from align.commands.run_eval import evaluate_run_folder, metric_label

    report = evaluate_run_folder(args.run_dir, list(args.overrides))
    for key, value in report["metrics"].items():
        print(f"{metric_label(key)}: {value['before']:.4f} -> {value['after']:.4f}")
    print(f"wrote {Path(args.run_dir) / 'eval.md'} and {Path(args.run_dir) / 'eval.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rewards.cli import check_port

    check_port(args.port)
    if args.runs is not None and not Path(args.runs).is_dir():
        raise ConfigError(f"--runs: {args.runs} is not a folder (the folder whose run folders the demo lists)")
    try:
        from demos.app import launch, parse_assignments, parse_reward_options
    except ImportError as err:
        raise ConfigError(f"align demo needs gradio ({err}): pip install -e '.[demo]'") from None
    parse_assignments(args.model_path, "--model-path")
    parse_reward_options(args.reward_option)  # a mistyped reward, option or missing file: before the demo starts
    launch(host=args.host, port=args.port, runs=args.runs or "runs", model_paths=args.model_path,
           reward_options=args.reward_option, share=args.share)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from align.env import environment_report

    for key, value in environment_report().items():
        print(f"{key:36s} {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``align models``: each adapter with its tasks, guidance kind, default steps and guidance,
    and the diffusers pipeline classes it loads."""
    from pipelines.registry import PIPELINE_CLASSES, adapter_class, list_adapters

    rows = [("name", "tasks", "guidance", "steps", "scale", "loads")]
    for name in list_adapters():
        cls = adapter_class(name)
        rows.append((name, ",".join(cls.tasks), cls.guidance_kind, str(cls.default_steps), f"{cls.default_guidance:g}",
                     " / ".join(PIPELINE_CLASSES.get(name, ("weights in the package",)))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from align.commands import parsers

    commands = {
        "sample": (parsers.add_sample, cmd_sample),
        "search": (parsers.add_search, cmd_search),
        "train": (parsers.add_train, cmd_train),
        "launch": (parsers.add_launch, cmd_launch),
        "label": (parsers.add_label, cmd_label),
        "sweep": (parsers.add_sweep, cmd_sweep),
        "eval": (parsers.add_eval, cmd_eval),
        "demo": (parsers.add_demo, cmd_demo),
        "env": (parsers.add_env, cmd_env),
        "models": (parsers.add_models, cmd_models),
    }
    parser = argparse.ArgumentParser(prog="align", description="Align diffusion and flow models with rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, handler in commands.values():
        add_parser(sub).set_defaults(func=handler)
    from rewards.cli import register_commands  # `align rewards list`, `align score`

    register_commands(sub)
    parser.command_choices = sub.choices  # name -> parser of every command (align launch checks the name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (argparse stops collecting positionals there)
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if "=" in (getattr(args, "method", None) or ""):  # `align train --config X key=value`: no method named
        args.overrides, args.method = [args.method, *args.overrides], None
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"align: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"align: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from align.training.optim import TrainingError
        from rewards.base import RewardError

        if not isinstance(err, (RewardError, TrainingError)):
            raise
        print(f"align: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
