"""The align demo (``align demo``): compare rewards, checkpoints and runs in the browser.

- **Compare**: prompts (one per line), a model, checkpoints (the base model and the LoRAs of run
  folders), rewards. The samples side by side with every reward's scores per sample and per
  dimension (video dimensions too; videos play in the gallery), a sortable score table, a bar chart
  per reward, and the base model's and a trained checkpoint's first sample compared (images: a slider;
  videos: both playing side by side, with their scores per dimension). Seeds,
  steps, CFG scale, step kernel and tree split steps are in "Advanced", with reward-guidance weights
  as sliders (inference-time guidance, ``align sample --guide``).
- **Edit**: a source image (uploaded, or one of the embedded editing default's examples) and
  instructions (one per line), an editing model (``toy_edit``, ``flux_kontext``, ``qwen_image_edit``,
  ``flux2``) and checkpoints: the source beside each checkpoint's edits, every reward's scores (the
  edit rewards read the source), and the base model's and a trained checkpoint's first edit on a slider.
- **Score files**: upload images or videos, score them with the selected rewards.
- **Runs**: pick a run folder: its before / after table (``align eval``'s ``eval.md`` when it was
  written, else the run's own first and last evaluation) and its reward curve.

Every event has an ``api_name`` (``/compare``, ``/score_files``, ``/run_info``, ``/list_runs``, ...), so
``gradio_client`` can drive it. A reward that cannot be built (missing weights) shows its one-line
error in the page; the other rewards still score.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: rewards of the embedded defaults, preselected per model
DEFAULT_REWARDS = {"toy": ["digit", "digit_judge", "colour", "stroke_thickness"],
                   "toy_video": ["motion", "frame_digit", "consistency", "frame_judge"],
                   "toy_edit": ["edit_instruction", "edit_judge", "preservation"]}
#: the models the Edit tab offers (their task list holds "edit")
EDIT_MODELS = ["toy_edit", "flux_kontext", "qwen_image_edit", "flux2"]
#: the embedded editing default's example sources and instructions (configs/prompts/toy_edit)
EDIT_EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "toy_edit"
#: differentiable rewards offered as guidance sliders (weight 0: off), with the slider's maximum
GUIDANCE_SLIDERS = {"digit": 200.0, "colour": 200.0, "stroke_thickness": 600.0}
#: step kernels offered in "Advanced" (flow models)
KERNELS = ["ode", "flow_grpo", "dance_grpo", "cps"]
BASE = "base"


@dataclass
class DemoSettings:
    #: the folder whose run folders the demo lists
    runs: Path = Path("runs")
    #: model name -> local folder (real models)
    model_paths: dict[str, str] = field(default_factory=dict)
    #: reward name -> options (e.g. aesthetic: {head_path: ...})
    reward_options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.runs = Path(self.runs)


def parse_assignments(texts: list[str], what: str) -> dict[str, str]:
    from align.errors import ConfigError

    out = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {text!r}")
        out[key.strip()] = value.strip()
    return out


def parse_reward_options(texts: list[str]) -> dict[str, dict]:
    """``REWARD.KEY=VALUE`` flags -> {reward: {key: value}} (values read as YAML: numbers, booleans)."""
    import yaml

    from align.errors import ConfigError

    options: dict[str, dict] = {}
    for dotted, value in parse_assignments(texts, "--reward-option").items():
        reward, sep, key = dotted.partition(".")
        if not sep:
            raise ConfigError(f"--reward-option: expected REWARD.KEY=VALUE, got {dotted}={value}")
        options.setdefault(reward, {})[key] = yaml.safe_load(value)
    from rewards.registry import check_reward_options

    for reward, values in options.items():  # a mistyped name, option or missing file: before the demo starts
        check_reward_options(reward, values, field="--reward-option")
    return options


class Demo:
    """The demo's state: loaded models (each with its run LoRAs attached by name) and rewards."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.models: dict[str, object] = {}
        self.rewards: dict[str, object] = {}

    # --- loading ----------------------------------------------------------------------------------
    def model(self, name: str):
        if name not in self.models:
            from align.models import ModelConfig, load_model

            self.models[name] = load_model(ModelConfig(name=name, path=self.settings.model_paths.get(name)))
        return self.models[name]

    def reward(self, name: str):
        """The reward ``name`` with its configured options (built once); raises its error."""
        if name not in self.rewards:
            from rewards import build_reward

            self.rewards[name] = build_reward({"name": name, **self.settings.reward_options.get(name, {})})
        return self.rewards[name]

    def use_checkpoint(self, adapter, checkpoint: str) -> None:
        """Make ``checkpoint`` (``base`` or a run folder / LoRA folder) the active weights."""
        from align.errors import ConfigError

        if checkpoint == BASE:
            adapter.use_lora(None)
            return
        folder = Path(checkpoint)
        lora = folder / "lora" if (folder / "run.json").is_file() else folder
        name = "ckpt_" + str(abs(hash(str(lora.resolve()))))
        if name not in adapter.lora_names():
            from align.models import check_lora_folder

            check_lora_folder(str(lora), field=f"checkpoint {checkpoint}")
            try:
                adapter.load_lora(lora, name=name)
            except ValueError as err:
                raise ConfigError(f"checkpoint {checkpoint}: {err}") from None
        adapter.use_lora(name)

    def runs(self) -> list[str]:
        root = self.settings.runs
        if not root.is_dir():
            return []
        return sorted(str(p.parent) for p in root.glob("**/run.json"))

    # --- scoring ------------------------------------------------------------------------------------
    def score(self, pixels: torch.Tensor, prompts: list[str], names: list[str]):
        """{reward: {dimension: (B,) tensor, "total": (B,)}} and {reward: error line} for rewards that
        failed to build or score."""
        scores, errors = {}, {}
        for name in names:
            try:
                out = self.reward(name)(pixels, prompts)
            except Exception as err:  # any reward failure is shown in the page, not a crash
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                continue
            # one-dimension rewards show their total only; several show each dimension and the total
            dims = {dim: value.float().cpu() for dim, value in out.scores.items()} if len(out.scores) > 1 else {}
            dims["total"] = out.total.float().cpu()
            scores[name] = dims
        return scores, errors

    # --- events -------------------------------------------------------------------------------------
    def compare(self, prompts_text: str, model: str, checkpoints: list[str], reward_names: list[str], seed: float,
                steps: float, guidance_scale: float, kernel: str, per_prompt: float, split_steps: str,
                *guide_weights: float):
        """Sample every prompt with every checkpoint (same seeds) and score the samples."""
        from align.errors import ConfigError
        from align.commands.sample import SampleConfig

        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
        if not prompts:
            raise ConfigError("give at least one prompt (one per line)")
        checkpoints = list(checkpoints or [BASE])
        adapter = self.model(model)
        config = SampleConfig(prompts=prompts, num_per_prompt=int(per_prompt), seed=int(seed))
        config.model.name = model
        config.rollout.num_steps = int(steps) if steps else None
        config.rollout.guidance_scale = float(guidance_scale)
        config.rollout.kernel = kernel
        if split_steps and split_steps.strip():
            config.rollout.split_steps = [int(s) for s in split_steps.replace(",", " ").split()]
        guides = {name: float(w) for name, w in zip(GUIDANCE_SLIDERS, guide_weights) if w}
        config.guidance.rewards = [{"name": name, "weight": w} for name, w in guides.items()]
        config.rollout.validate(config.rollout.num_steps or 1)
        return self.sample_and_score(adapter, config, checkpoints, reward_names)

    def sample_and_score(self, adapter, config, checkpoints: list[str], reward_names: list[str],
                         lead: list | None = None):
        """Sample ``config``'s prompts with every checkpoint (same seeds), score them; the page's outputs
        (``lead``: gallery entries shown first, e.g. an edit's source)."""
        from align.commands.sample import generate

        gallery, rows, errors, firsts = list(lead or []), [], {}, {}
        out_dir = Path(tempfile.mkdtemp(prefix="align-demo-"))
        for checkpoint in checkpoints:
            self.use_checkpoint(adapter, checkpoint)
            pixels, sample_prompts, _ = generate(adapter, config)
            scores, failed = self.score(pixels, sample_prompts, list(reward_names or []))
            errors.update(failed)
            label = checkpoint_label(checkpoint)
            for i, prompt in enumerate(sample_prompts):
                row = {"checkpoint": label, "prompt": str(prompt), "sample": i}
                for name, dims in scores.items():
                    for dim, values in dims.items():
                        row[f"{name}" if dim == "total" else f"{name}.{dim}"] = round(float(values[i]), 6)
                rows.append(row)
                caption = f"{label} | {prompt} | {score_text(row)}"
                gallery.append((media_file(pixels[i], out_dir / f"{len(gallery):04d}"), caption))
                if i == 0:
                    firsts[label] = (pixels[0], row)
        adapter.use_lora(None)
        table = score_table(rows)
        slider = pair_video = None
        pair_text = ""
        labels = list(firsts)
        if len(labels) >= 2:
            (base, base_row), (last, last_row) = firsts[labels[0]], firsts[labels[-1]]
            if base.ndim == 3:
                slider = (display_image(base), display_image(last))
            else:
                pair_video = media_file(side_by_side(base, last), out_dir / "side_by_side")
                pair_text = (f"left: **{labels[0]}** ({score_text(base_row)})  \nright: **{labels[-1]}** "
                             f"({score_text(last_row)})")
        return (gallery, table, bar_chart(rows, list(reward_names or [])), slider, pair_video, pair_text,
                error_text(errors))

    def edit(self, source, instructions_text: str, model: str, checkpoints: list[str], reward_names: list[str],
             seed: float, steps: float, guidance_scale: float, per_prompt: float):
        """Edit the source image with every instruction and checkpoint (same seeds), score the edits
        (the edit rewards read the source): gallery (the source first), table, chart, slider, errors."""
        from align.commands.sample import SampleConfig
        from align.errors import ConfigError
        from pipelines.base import Prompt

        if source is None:
            raise ConfigError("give a source image: upload one or pick an example")
        instructions = [p.strip() for p in (instructions_text or "").splitlines() if p.strip()]
        if not instructions:
            raise ConfigError("give at least one instruction (one per line)")
        adapter = self.model(model)
        if "edit" not in adapter.tasks:
            raise ConfigError(f"the {model!r} model does not edit images (tasks: {', '.join(adapter.tasks)})")
        image = source_tensor(source)
        config = SampleConfig(prompts=[Prompt(text, image) for text in instructions], num_per_prompt=int(per_prompt),
                              seed=int(seed))
        config.model.name = model
        config.rollout.num_steps = int(steps) if steps else None
        config.rollout.guidance_scale = float(guidance_scale)
        out_dir = Path(tempfile.mkdtemp(prefix="align-demo-source-"))
        lead = [(media_file(image, out_dir / "source"), "source")]
        gallery, table, chart, slider, _, _, errors = self.sample_and_score(
            adapter, config, list(checkpoints or [BASE]), reward_names, lead)
        return gallery, table, chart, slider, errors

    def score_files(self, files: list, prompts_text: str, reward_names: list[str]):
        """Score uploaded images (or videos) with the selected rewards; one prompt per file (or one for all)."""
        from align.errors import ConfigError

        paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
        if not paths:
            raise ConfigError("upload at least one image or video")
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()] or [""]
        if len(prompts) == 1:
            prompts = prompts * len(paths)
        if len(prompts) != len(paths):
            raise ConfigError(f"{len(paths)} files but {len(prompts)} prompts: give one prompt, or one per file")
        pixels = load_media(paths)
        scores, errors = self.score(pixels, prompts, list(reward_names or []))
        rows = []
        for i, (path, prompt) in enumerate(zip(paths, prompts)):
            row = {"file": path.name, "prompt": prompt}
            for name, dims in scores.items():
                for dim, values in dims.items():
                    row[f"{name}" if dim == "total" else f"{name}.{dim}"] = round(float(values[i]), 6)
            rows.append(row)
        return score_table(rows), error_text(errors)

    def run_info(self, run_dir: str):
        """A run folder's before / after table (Markdown) and its reward curve (a figure)."""
        from align.errors import ConfigError

        folder = Path(run_dir or "")
        if not (folder / "run.json").is_file():
            raise ConfigError(f"{run_dir!r} is not a run folder (no run.json)")
        return run_table(folder), reward_curve(folder), side_by_side_image(folder)


def source_tensor(source) -> torch.Tensor:
    """An uploaded or picked source (a PIL image, a numpy array or a path) -> (3, H, W) in [0, 1]."""
    import numpy as np

    from pipelines.base import load_image

    if isinstance(source, (str, Path)):
        from PIL import Image

        source = Image.open(source)
    if isinstance(source, np.ndarray):
        return torch.from_numpy(source[..., :3].copy()).permute(2, 0, 1).float() / 255
    rgb = source.convert("RGB")
    return load_image(rgb, rgb.height, rgb.width)


def edit_examples() -> list[list[str]]:
    """[source path, instruction] rows of the embedded editing default's evaluation edits."""
    file = EDIT_EXAMPLES / "eval.jsonl"
    if not file.is_file():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [[str(EDIT_EXAMPLES / row["image"]), row["prompt"]] for row in rows]


def score_text(row: dict) -> str:
    """A sample's scores for a caption: every dimension (``motion.direction=0.981``) and one-dimension total."""
    from rewards.base import leaf_dimensions

    shown = leaf_dimensions([k for k in row if k not in ("checkpoint", "prompt", "sample")])
    return ", ".join(f"{k}={row[k]:.3f}" for k in shown)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Two videos (F, C, H, W) as one, frames side by side with a grey ``gap`` between them."""
    frames, channels, height, _ = left.shape
    divider = torch.full((frames, channels, height, gap), 0.5, dtype=left.dtype)
    return torch.cat([left.cpu(), divider, right.cpu()], dim=-1)


def checkpoint_label(checkpoint: str) -> str:
    return BASE if checkpoint == BASE else Path(checkpoint).name


def display_image(pixels: torch.Tensor):
    """A sample (C, H, W) in [0, 1] as a PIL image, small ones enlarged without smoothing."""
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    from align.media import display_scale

    image = to_pil_image(pixels.clamp(0, 1))
    scale = display_scale(image.height)
    return image.resize((image.width * scale, image.height * scale), resample=Image.NEAREST) if scale > 1 else image


def media_file(sample: torch.Tensor, stem: Path) -> str:
    """A sample saved for the page: PNG for an image, MP4 for a video (frames enlarged like images)."""
    if sample.ndim == 4:
        from diffusers.utils import export_to_video

        path = str(stem) + ".mp4"
        export_to_video([display_image(f) for f in sample], path, fps=4)
        return path
    path = str(stem) + ".png"
    display_image(sample).save(path)
    return path


def load_media(paths: list[Path]) -> torch.Tensor:
    """Uploaded images ((B, 3, H, W), resized to the first one's size) or videos ((B, F, 3, H, W)) in [0, 1]."""
    import numpy as np
    from PIL import Image

    from align.errors import ConfigError

    videos = [p.suffix.lower() in (".mp4", ".gif", ".webm", ".mov") for p in paths]
    if any(videos) and not all(videos):
        raise ConfigError("upload images or videos, not both at once")
    if all(videos):
        import imageio.v3 as iio

        clips = [torch.from_numpy(np.asarray(iio.imread(p))[..., :3].copy()).permute(0, 3, 1, 2).float() / 255 for p in paths]
        frames = min(c.shape[0] for c in clips)
        return torch.stack([c[:frames] for c in clips])
    images = [Image.open(p).convert("RGB") for p in paths]
    size = images[0].size
    return torch.stack([torch.from_numpy(np.asarray(im.resize(size) if im.size != size else im).copy())
                        .permute(2, 0, 1).float() / 255 for im in images])


def score_table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def error_text(errors: dict[str, str]) -> str:
    if not errors:
        return ""
    return "\n".join(f"**{name}** could not score: {message}" for name, message in errors.items())


def bar_chart(rows: list[dict], reward_names: list[str]):
    """One bar chart per reward: its mean total per checkpoint (whiskers: std over samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows)
    names = [n for n in reward_names if n in frame.columns]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        stats = frame.groupby("checkpoint", sort=False)[name].agg(["mean", "std"]).fillna(0.0)
        ax.bar(stats.index, stats["mean"], yerr=stats["std"], capsize=3, color="tab:blue")
        ax.set(title=name, ylabel="score (mean over samples)")
        ax.tick_params(axis="x", rotation=20)
        ax.grid(alpha=0.3, axis="y")
    if not names:
        axes[0][0].set_axis_off()
    fig.tight_layout()
    return fig


def run_table(folder: Path) -> str:
    """``eval.md`` of ``align eval`` when present, else the run's first and last evaluation."""
    if (folder / "eval.json").is_file():
        from align.commands.run_eval import eval_markdown

        report = json.loads((folder / "eval.json").read_text())
        return eval_markdown(report).split("\n\nBefore (left)")[0]
    from align.commands.sweep_report import evaluations

    evals = evaluations(folder)
    if not evals:
        return f"{folder} has no evaluation yet."
    first, last = evals[0], evals[-1]
    lines = [f"**{folder.name}**: the run's own evaluations (iteration 0 and {last['iteration']}; "
             f"`align eval {folder}` writes the full table)", "", "| metric | before | after | change |",
             "|---|---|---|---|"]
    for key in [k for k in last if k.startswith("eval/")]:
        lines.append(f"| {key.removeprefix('eval/')} | {first.get(key, float('nan')):.4f} | {last[key]:.4f} | "
                     f"{last[key] - first.get(key, float('nan')):+.4f} |")
    return "\n".join(lines)


def reward_curve(folder: Path):
    """The run's evaluation reward and held-out rewards against model evaluations (and, when there
    are no evaluations between the first and last, the training reward per iteration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.commands.sweep_report import evaluations

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "metrics.jsonl").is_file() else []
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    train = [(r.get("nfe", 0), r["reward/mean"]) for r in rows if "reward/mean" in r]
    if train:
        ax.plot(*zip(*train), color="0.7", lw=1, label="training rollouts (reward/mean)")
    evals = evaluations(folder)
    for key in [k for k in (evals[-1] if evals else {}) if k.startswith("eval/") and k != "eval/diversity"]:
        ax.plot([e["nfe"] for e in evals if key in e], [e[key] for e in evals if key in e], marker="o",
                label=key.removeprefix("eval/"))
    ax.set(xlabel="model evaluations (NFE)", ylabel="reward", title=f"{folder.name}: reward during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def side_by_side_image(folder: Path):
    for candidate in (folder / "eval" / "side_by_side.png", folder / "samples" / "after" / "grid.png"):
        if candidate.is_file():
            return str(candidate)
    return None


def build_app(settings: DemoSettings | None = None):
    import gradio as gr

    from pipelines.registry import list_adapters
    from rewards.registry import available_rewards

    demo = Demo(settings or DemoSettings())
    rewards = available_rewards()

    def guarded(fn):
        """Config errors and missing files become a message in the page (gr.Error), not a crash."""
        import functools

        from align.errors import ConfigError

        @functools.wraps(fn)
        def wrapper(*args):
            try:
                return fn(*args)
            except (ConfigError, FileNotFoundError, ValueError) as err:
                raise gr.Error(str(err).splitlines()[0]) from None
        return wrapper

    with gr.Blocks(title="align demo") as app:
        gr.Markdown("# align: compare rewards, checkpoints and runs")
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompts = gr.Textbox(label="Prompts (one per line)", lines=4,
                                         value="a red digit 3\na blue digit 8", elem_id="prompts")
                    model = gr.Dropdown(list_adapters(), value="toy", label="Model")
                    checkpoints = gr.Dropdown([BASE, *demo.runs()], value=[BASE], multiselect=True,
                                              allow_custom_value=True, label="Checkpoints (base, run folders)")
                    reward_pick = gr.Dropdown(rewards, value=DEFAULT_REWARDS["toy"], multiselect=True, label="Rewards")
                    with gr.Accordion("Advanced", open=False):
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        steps = gr.Number(value=10, precision=0, label="Steps")
                        cfg = gr.Slider(0.0, 10.0, value=1.0, step=0.5, label="CFG scale")
                        kernel = gr.Dropdown(KERNELS, value="ode", label="Step kernel")
                        per_prompt = gr.Slider(1, 16, value=4, step=1, label="Samples per prompt")
                        split = gr.Textbox(label="Tree split steps (e.g. 0 3; empty: no tree)", value="")
                        gr.Markdown("Reward guidance (inference time, 0 = off)")
                        sliders = [gr.Slider(0.0, top, value=0.0, label=f"guide: {name}")
                                   for name, top in GUIDANCE_SLIDERS.items()]
                    run_button = gr.Button("Compare", variant="primary", elem_id="compare")
                with gr.Column(scale=2):
                    errors = gr.Markdown(elem_id="errors")
                    gallery = gr.Gallery(label="Samples (checkpoint | prompt | scores)", columns=8, height="auto")
                    table = gr.Dataframe(label="Scores per sample and dimension (click a column to sort)",
                                         interactive=False, elem_id="scores")
                    chart = gr.Plot(label="Mean score per checkpoint")
                    slider = gr.ImageSlider(label="Base vs trained (first sample)")
                    pair_video = gr.Video(label="Base vs trained videos (first sample, side by side)",
                                          autoplay=True, loop=True, height=320, visible=False, elem_id="pair_video")
                    pair_text = gr.Markdown(elem_id="pair_scores")
            model.change(lambda name: gr.update(value=DEFAULT_REWARDS.get(name, [])), model, reward_pick,
                         api_name="default_rewards")
            def compare(*args):
                """demo.compare, showing the image slider or the side-by-side video, whichever applies."""
                gallery, table, chart, pair_images, video, text, errors = guarded(demo.compare)(*args)
                return (gallery, table, chart, gr.update(value=pair_images, visible=video is None),
                        gr.update(value=video, visible=video is not None), text, errors)

            run_button.click(compare,
                             [prompts, model, checkpoints, reward_pick, seed, steps, cfg, kernel, per_prompt, split,
                              *sliders], [gallery, table, chart, slider, pair_video, pair_text, errors],
                             api_name="compare")
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    source = gr.Image(label="Source image", type="pil", height=160, elem_id="edit_source")
                    instructions = gr.Textbox(label="Instructions (one per line)", lines=3,
                                              value="make it blue\nmake it thicker", elem_id="edit_instructions")
                    gr.Examples(edit_examples()[:8], [source, instructions], label="Examples (held-out digits)")
                    edit_model = gr.Dropdown(EDIT_MODELS, value="toy_edit", label="Editing model")
                    edit_checkpoints = gr.Dropdown([BASE, *demo.runs()], value=[BASE], multiselect=True,
                                                   allow_custom_value=True, label="Checkpoints (base, run folders)")
                    edit_rewards = gr.Dropdown(rewards, value=DEFAULT_REWARDS["toy_edit"], multiselect=True,
                                               label="Rewards")
                    with gr.Accordion("Advanced", open=False):
                        edit_seed = gr.Number(value=0, precision=0, label="Seed")
                        edit_steps = gr.Number(value=10, precision=0, label="Steps")
                        edit_cfg = gr.Slider(0.0, 10.0, value=3.0, step=0.5, label="CFG scale")
                        edit_per = gr.Slider(1, 16, value=2, step=1, label="Edits per instruction")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                with gr.Column(scale=2):
                    edit_errors = gr.Markdown(elem_id="edit_errors")
                    edit_gallery = gr.Gallery(label="Source, then each checkpoint's edits (checkpoint | instruction | "
                                              "scores)", columns=8, height="auto")
                    edit_table = gr.Dataframe(label="Scores per edit and dimension", interactive=False,
                                              elem_id="edit_scores")
                    edit_chart = gr.Plot(label="Mean score per checkpoint")
                    edit_slider = gr.ImageSlider(label="Base vs trained (first edit)")
            edit_model.change(lambda name: gr.update(value=DEFAULT_REWARDS.get(name, [])), edit_model, edit_rewards,
                              api_name="default_edit_rewards")
            edit_button.click(guarded(demo.edit), [source, instructions, edit_model, edit_checkpoints, edit_rewards,
                                                   edit_seed, edit_steps, edit_cfg, edit_per],
                              [edit_gallery, edit_table, edit_chart, edit_slider, edit_errors], api_name="edit")
        with gr.Tab("Score files"):
            files = gr.File(file_count="multiple", label="Images or videos")
            file_prompts = gr.Textbox(label="Prompt (one for all, or one per file)", lines=2)
            file_rewards = gr.Dropdown(rewards, value=DEFAULT_REWARDS["toy"], multiselect=True, label="Rewards")
            score_button = gr.Button("Score", variant="primary")
            file_errors = gr.Markdown()
            file_table = gr.Dataframe(label="Scores", interactive=False)
            score_button.click(guarded(demo.score_files), [files, file_prompts, file_rewards],
                               [file_table, file_errors], api_name="score_files")
        with gr.Tab("Runs"):
            with gr.Row():
                run_pick = gr.Dropdown(demo.runs(), label="Run folder", allow_custom_value=True, elem_id="run_pick")
                show = gr.Button("Show run", variant="primary", elem_id="show_run")
                refresh = gr.Button("Refresh list")
            run_md = gr.Markdown()
            curve = gr.Plot(label="Reward curve")
            grids = gr.Image(label="Before / after samples", type="filepath")
            show.click(guarded(demo.run_info), run_pick, [run_md, curve, grids], api_name="run_info")
            run_pick.change(guarded(demo.run_info), run_pick, [run_md, curve, grids], api_name="pick_run")
            refresh.click(lambda: gr.update(choices=demo.runs()), None, run_pick, api_name="list_runs")
    app.demo_state = demo
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, runs: str = "runs", model_paths: list[str] = (),
           reward_options: list[str] = (), share: bool = False, block: bool = True):
    settings = DemoSettings(runs=Path(runs), model_paths=parse_assignments(list(model_paths), "--model-path"),
                            reward_options=parse_reward_options(list(reward_options)))
    app = build_app(settings)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return app
