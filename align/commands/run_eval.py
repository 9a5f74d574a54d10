"""The standard before / after evaluation of any run folder (``align eval RUN_DIR``).

The run's own config (``config.yaml``) gives the model, the evaluation prompts and seed
(``eval_prompts``, ``eval:``), the trained reward and the held-out rewards; the base model is
evaluated, then the trained weights (the run's ``lora/`` export, or its newest checkpoint when it
has none: an unfinished run, full fine-tuning). Written beside the run:

- ``eval.json``: every metric before and after, with what was evaluated;
- ``eval.md``: the same as a table (metric, before, after, change), with the sample grids;
- ``eval/before/``, ``eval/after/``: the samples and grids, and ``eval/side_by_side.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import ConfigError


def load_run_config(run_dir: Path, overrides: list[str] = ()):
    """(trainer module, config) of a run folder."""
    from align.config import load_config
    from align.trainers import trainer_module

    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise ConfigError(f"align eval: {run_dir} is not a run folder (no run.json)")
    info = json.loads(info_path.read_text())
    module = trainer_module(info["trainer"])
    return module, load_config(module.CONFIG, run_dir / info.get("config", "config.yaml"), list(overrides))


def load_trained_weights(adapter, config, run_dir: Path) -> str:
    """Put the run's trained weights on ``adapter``: ``lora/`` when the run exported one, else the
    newest intact checkpoint's trainable weights. Returns what was loaded."""
    if (run_dir / "lora").is_dir():
        adapter.load_lora(run_dir / "lora")
        return str(run_dir / "lora")
    from align.training.checkpoint_files import read_part
    from align.training.run_folder import newest_checkpoint_state

    newest = newest_checkpoint_state(run_dir)
    if newest is None:
        raise ConfigError(f"align eval: {run_dir} has neither a lora/ export nor a checkpoint to evaluate")
    checkpoint = newest[0]
    if config.lora.enabled:
        adapter.add_lora(config.lora.rank, config.lora.alpha, config.lora.target_modules)
    trainable = read_part(checkpoint, "trainable")
    missing, unexpected = adapter.base_denoiser.load_state_dict(trainable, strict=False)
    if unexpected:
        raise ConfigError(f"align eval: {checkpoint} does not match the model (first unknown weight: {unexpected[0]})")
    return str(checkpoint)


def side_by_side(before: Path, after: Path, out: Path) -> Path:
    """The before and after grids next to each other, with a gap."""
    from PIL import Image

    left, right = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    gap = max(4, left.width // 50)
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    canvas.save(out)
    return out


def evaluate_run_folder(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """Evaluate the run folder before and after training; write eval.json, eval.md and the grids.
    Returns the eval.json content."""
    from align.evaluation import evaluate
    from align.prompts import check_prompt_images
    from align.models import load_model
    from align.media import write_samples
    from align.trainers.common import eval_prompt_list
    from align.trainers.scoring import build_reward_set, heldout_specs
    from pipelines.registry import model_tasks

    run_dir = Path(run_dir)
    module, config = load_run_config(run_dir, overrides)
    reward, heldout = build_reward_set(config)
    model = config.model
    eval_prompts = eval_prompt_list(config)  # the JSONL form names the images of image-to-video
    check_prompt_images(eval_prompts, model.name, model_tasks(model.name, model.path), field="eval_prompt_file")
    adapter = load_model(model)
    latent = {"height": model.height, "width": model.width, "num_frames": model.num_frames}
    out = run_dir / "eval"
    results, grids = {}, {}
    for stage in ("before", "after"):
        if stage == "after":
            weights = load_trained_weights(adapter, config, run_dir)
        metrics, pixels, prompts = evaluate(adapter, reward, eval_prompts, config.eval, config.rollout,
                                            negative_prompt=config.negative_prompt, heldout=heldout,
                                            latent_kwargs=latent)
        results[stage] = metrics
        grids[stage] = write_samples(pixels.cpu(), prompts, out / stage, columns=config.eval.per_prompt)
    side_by_side(grids["before"], grids["after"], out / "side_by_side.png")
    report = {"run": str(run_dir), "trainer": config.trainer, "weights": weights,
              "rewards": [str(r) for r in config.rewards], "heldout_rewards": [str(r) for r in heldout_specs(config)],
              "eval_prompts": [str(p) for p in eval_prompts], "per_prompt": config.eval.per_prompt, "seed": config.eval.seed,
              "metrics": {key: {"before": results["before"][key], "after": results["after"][key]}
                          for key in results["after"]},
              "grids": {"before": "eval/before/grid.png", "after": "eval/after/grid.png",
                        "side_by_side": "eval/side_by_side.png"}}
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run_dir / "eval.json")
    (run_dir / "eval.md").write_text(eval_markdown(report))
    return report


def metric_label(key: str) -> str:
    if key == "eval/reward":
        return "trained reward"
    if key.startswith("eval/reward/"):
        return f"trained: {key.split('/', 2)[2]}"
    if key.startswith("eval/heldout/"):
        return f"held-out: {key.split('/', 2)[2]}"
    return key.split("/")[-1]


def eval_markdown(report: dict) -> str:
    lines = [f"# Evaluation of {report['run']} ({report['trainer']})", "",
             f"{len(report['eval_prompts'])} evaluation prompts x {report['per_prompt']} samples, seed "
             f"{report['seed']}; trained weights: `{report['weights']}`.", "",
             "| metric | before | after | change |", "|---|---|---|---|"]
    for key, value in report["metrics"].items():
        lines.append(f"| {metric_label(key)} | {value['before']:.4f} | {value['after']:.4f} | "
                     f"{value['after'] - value['before']:+.4f} |")
    lines += ["", "Before (left) and after (right), the same prompts and start noise:", "",
              f"![before and after]({report['grids']['side_by_side']})", ""]
    return "\n".join(lines)
