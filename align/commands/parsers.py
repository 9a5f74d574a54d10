"""The argument parsers of the ``align`` commands, one function each (align/commands/cli.py binds
them to their handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: accelerate's launch configs shipped with the package, by name (align launch PRESET ...)
ACCELERATE_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_presets() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_PRESETS.glob("*.yaml"))


def add_sample(sub) -> argparse.ArgumentParser:
    """``align sample``."""
    sample = sub.add_parser("sample", help="sample images / videos from a model over any rollout topology")
    sample.add_argument("--config", help="YAML config (SampleConfig)")
    sample.add_argument("--model", help="adapter name: toy, sd3, flux, wan, sd, sdxl")
    sample.add_argument("--model-path", help="local model directory or hub name")
    sample.add_argument("--lora", help="a trained LoRA folder (a run's lora/ export) to sample from")
    sample.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sample.add_argument("--image", action="append",
                        help="image-to-video's first frame or an edit's source (one for every prompt, or repeat: "
                             "one per prompt; a,b: several sources of one prompt)")
    sample.add_argument("--num", type=int, help="samples per prompt")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--device")
    sample.add_argument("--dtype")
    sample.add_argument("--out", help="output directory")
    sample.add_argument("--guide", action="append", metavar="NAME=WEIGHT",
                        help="reward guidance (Flow-NRG): a reward and its weight, e.g. stroke_thickness=300, or "
                             "one dimension of a reward, e.g. video_frames.motion_smoothness=2 (repeat for several)")
    sample.add_argument("overrides", nargs="*", help="key=value config overrides")
    return sample


def add_search(sub) -> argparse.ArgumentParser:
    """``align search``."""
    find = sub.add_parser("search", help="test-time search: best-of-N or pruned (TTSnap) over start noises")
    find.add_argument("--config", help="YAML config (SearchConfig)")
    find.add_argument("--model", help="adapter name: toy, sd3, flux, wan, sd, sdxl")
    find.add_argument("--model-path", help="local model directory or hub name")
    find.add_argument("--lora", help="a trained LoRA folder to search with")
    find.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    find.add_argument("--reward", action="append", help="the reward that picks the best (repeat to sum several)")
    find.add_argument("--method", help="pruned (default) or best_of_n")
    find.add_argument("--num", type=int, help="start noises per prompt")
    find.add_argument("--top-k", type=int, help="best samples written per prompt")
    find.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    find.add_argument("--seed", type=int)
    find.add_argument("--device")
    find.add_argument("--out", help="output directory")
    find.add_argument("overrides", nargs="*", help="key=value config overrides")
    return find


def add_train(sub) -> argparse.ArgumentParser:
    """``align train``."""
    from align.trainers import TRAINERS

    train = sub.add_parser("train", help="fine-tune a model against rewards with one method")
    train.add_argument("method", nargs="?", help=f"trainer: {', '.join(TRAINERS)} (default: the `trainer` "
                                                "key of --config)")
    train.add_argument("--config", help="YAML config of the trainer")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (defaults, --config, overrides) as YAML and exit")
    train.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=1e-4")
    return train


def add_launch(sub) -> argparse.ArgumentParser:
    """``align launch``."""
    launch = sub.add_parser("launch", help="run a command under accelerate launch with a shipped preset "
                                           "(align launch [--dry-run] PRESET train ...)")
    launch.add_argument("--dry-run", action="store_true", help="print the accelerate command and exit")
    launch.add_argument("preset", help="configs/accelerate/<preset>.yaml: " + ", ".join(accelerate_presets()))
    launch.add_argument("command", nargs=argparse.REMAINDER, help="the align command, e.g. train flow_grpo ...")
    return launch


def add_label(sub) -> argparse.ArgumentParser:
    """``align label``."""
    label = sub.add_parser("label", help="sample preference pairs for a person to judge (then align train d3po "
                                         "labels=OUT/pairs.jsonl, or align train dpo pairs=OUT/pairs.jsonl)")
    label.add_argument("--config", help="a d3po config (model, rollout, prompts, seed)")
    label.add_argument("--out", required=True, help="the label folder to write")
    label.add_argument("--pairs", type=int, default=16, help="pairs to judge")
    label.add_argument("overrides", nargs="*", help="key=value config overrides")
    return label


def add_sweep(sub) -> argparse.ArgumentParser:
    """``align sweep``."""
    sweep = sub.add_parser("sweep", help="sweep methods x rewards x settings x seeds (align sweep FILE), or "
                                         "write a sweep folder's report (align sweep report DIR)")
    sweep.add_argument("target", nargs="+", help="a sweep file, or: report DIR")
    sweep.add_argument("--workers", type=int, default=1, help="processes running trials at once")
    sweep.add_argument("--no-report", action="store_true", help="skip the report at the end")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file")
    return sweep


def add_eval(sub) -> argparse.ArgumentParser:
    """``align eval``."""
    evaluation = sub.add_parser("eval", help="the before / after table of a run folder (eval.md, eval.json, grids)")
    evaluation.add_argument("run_dir", help="a run folder (holds run.json)")
    evaluation.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. eval.per_prompt=8)")
    return evaluation


def add_demo(sub) -> argparse.ArgumentParser:
    """``align demo``."""
    demo = sub.add_parser("demo", help="the Gradio demo: compare rewards, checkpoints and runs in a browser")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--runs", default=None, help="the folder whose run folders the demo lists (default: runs)")
    demo.add_argument("--model-path", action="append", default=[], metavar="NAME=PATH",
                      help="a real model's local folder, e.g. sd3=/models/sd3.5-medium (repeat for several)")
    demo.add_argument("--reward-option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                      help="a reward option, e.g. aesthetic.head_path=/models/sac+logos+ava1-l14-linearMSE.pth")
    demo.add_argument("--share", action="store_true", help="a public gradio.live link")
    return demo


def add_env(sub) -> argparse.ArgumentParser:
    """``align env``."""
    env = sub.add_parser("env", help="versions, devices and attention backends")
    return env


def add_models(sub) -> argparse.ArgumentParser:
    """``align models``."""
    models = sub.add_parser("models", help="list model adapters")
    return models
