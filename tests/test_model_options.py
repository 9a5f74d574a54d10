"""What every model family of ``FAMILY_CASES`` shares beyond its own exactness tests (tests/test_adapter_<family>.py):
loading through ``load_model`` from a saved folder with the model options of a config (text
encoders offloaded, an attention backend through diffusers' dispatch), the adapter's declared
tasks, and ``align models``."""

from __future__ import annotations

import pytest
import torch

try:
    from tests.tiny_models import EDIT_SOURCE_SIZE, FAMILY_CASES, build_family, model_dir_cache
except ImportError:  # tests/ on sys.path
    from tiny_models import EDIT_SOURCE_SIZE, FAMILY_CASES, build_family, model_dir_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return model_dir_cache(root, {case: (lambda _dir, case=case: build_family(case, root)) for case in FAMILY_CASES})


def _load(case, path, **options):
    from align.models import SOURCE_SIZE_MODELS, ModelConfig, load_model

    height, width, frames = FAMILY_CASES[case][3]
    if FAMILY_CASES[case][0] in SOURCE_SIZE_MODELS:
        options["source_size"] = EDIT_SOURCE_SIZE
    return load_model(ModelConfig(name=FAMILY_CASES[case][0], path=path, device="cpu", dtype="float32",
                                  height=height, width=width, num_frames=frames, **options))


def _prediction(adapter, case, prompts=("a red digit 3",)):
    from pipelines.base import Prompt

    height, width, frames = FAMILY_CASES[case][3]
    task = FAMILY_CASES[case][5]
    if task in ("i2v", "edit"):  # the first frame, or the edit's source
        side = (height, width) if task == "i2v" else (EDIT_SOURCE_SIZE, EDIT_SOURCE_SIZE)
        prompts = [Prompt(p, torch.rand(3, *side, generator=torch.Generator().manual_seed(1))) for p in prompts]
    cond = adapter.encode(list(prompts), "", FAMILY_CASES[case][4])
    x = adapter.initial_noise(len(prompts), torch.Generator().manual_seed(0), height=height, width=width,
                              num_frames=frames)
    schedule = adapter.schedule(4, latent_shape=tuple(x.shape[1:]))
    with torch.no_grad():
        return adapter.predict(x, schedule.timesteps[1], cond)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_offloaded_text_encoders_and_a_dispatched_attention_backend_predict_the_same(case, family_dirs):
    """model.offload_text_encoders keeps each encoder on the CPU behind accelerate's offload hook
    (moved to the device only while it encodes) and model.attention_backend routes every attention
    call through diffusers' dispatch: neither changes a prediction."""
    path = family_dirs(case)
    plain = _load(case, path)
    tuned = _load(case, path, offload_text_encoders=True, attention_backend="_native_math")
    names = plain.text_encoder_names
    assert names and all(getattr(tuned.pipe, n, None) is not None for n in names)
    assert all(hasattr(getattr(tuned.pipe, n), "_hf_hook") for n in names), "every encoder is offloaded"
    processors = [m.processor for m in tuned.base_denoiser.modules() if getattr(m, "processor", None) is not None]
    # every processor that goes through the dispatch takes the backend (HunyuanVideo 1.5's small text
    # token refiner keeps diffusers' plain SDPA processor: the blocks' attention is dispatched)
    dispatched = [p for p in processors if hasattr(p, "_attention_backend")]
    assert len(dispatched) >= len(processors) / 2 and all(p._attention_backend == "_native_math" for p in dispatched)
    torch.testing.assert_close(_prediction(tuned, case), _prediction(plain, case), atol=1e-5, rtol=1e-5)


def test_align_models_lists_each_adapter_with_its_tasks_guidance_and_steps(capsys):
    from align.commands.cli import main
    from pipelines.registry import adapter_class, list_adapters

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "tasks", "guidance", "steps", "scale"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(list_adapters())
    for name, row in rows.items():
        cls = adapter_class(name)
        assert row[1] == ",".join(cls.tasks) and row[2] == cls.guidance_kind and row[3] == str(cls.default_steps)
    assert rows["qwen_image"][2] == "cfg_rescaled" and rows["flux2"][2] == "embedded"
    assert rows["wan22"][1] == "t2v,i2v" and rows["hunyuan_video15_i2v"][1] == "i2v"


def test_sde_windows_reach_the_trained_expert(family_dirs):
    """Wan 2.2 A14B with model.train_experts=high_noise: only the steps above the boundary train, so
    a Flow-GRPO window (one SDE step) is drawn among those; none reaching it is one line."""
    import random

    from align.config import load_config
    from align.errors import ConfigError
    from align.trainers.checks import steps_of_trained_networks
    from align.trainers.flow_grpo import FlowGRPOConfig, rollout_for_iteration
    from pipelines.registry import load_adapter

    size = {"height": 32, "width": 32, "num_frames": 5}
    high = load_adapter("wan22", family_dirs("wan22_a14b"), train_experts="high_noise")
    both = load_adapter("wan22", family_dirs("wan22_a14b"))
    experts = [high.expert_at(t) for t in high.schedule(6, latent_shape=high.latent_shape(**size)).timesteps]
    assert experts[0] == 0 and experts[-1] == 1  # both experts take steps
    trained = steps_of_trained_networks(high, 6, size)
    assert trained == {i for i, e in enumerate(experts) if e == 0}
    assert steps_of_trained_networks(both, 6, size) is None
    config = load_config(FlowGRPOConfig, None, ["rollout.num_steps=6", "window_size=1"])
    windows = {tuple(rollout_for_iteration(config, i, random.Random(i), trained).sde_steps) for i in range(30)}
    assert windows == {(s,) for s in trained if s < 5}
    everywhere = {tuple(rollout_for_iteration(config, i, random.Random(i)).sde_steps) for i in range(60)}
    assert len(everywhere) == 5  # without a trained subset, any start before the last step
    with pytest.raises(ConfigError, match="reaches a step of the trained expert"):
        rollout_for_iteration(config, 0, random.Random(0), {5})


def test_align_sample_animates_the_given_image(family_dirs, tmp_path, capsys):
    """``align sample --image``: image-to-video from the command line; the image conditions every
    sample (another image, another video), and an image for a text-to-video checkpoint, or a count
    that fits neither one nor every prompt, is one line."""
    from PIL import Image

    from align.commands.cli import main

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(red)
    Image.new("RGB", (64, 64), (30, 30, 220)).save(blue)
    ti2v = family_dirs("wan22_i2v")
    common = ["sample", "--model", "wan22", "--model-path", ti2v, "--prompt", "a ball rolls", "--num", "1",
              "--steps", "2", "--device", "cpu", "model.height=64", "model.width=64", "model.num_frames=5"]
    videos = []
    for image in (red, blue):
        out = tmp_path / image.stem
        assert main([*common, "--image", str(image), "--out", str(out)]) == 0
        videos.append(sorted(out.glob("*.mp4")) or sorted(out.glob("*.png")))
        assert videos[-1], list(out.iterdir())
    capsys.readouterr()
    assert videos[0][0].read_bytes() != videos[1][0].read_bytes()

    assert main([*common, "--image", str(red), "--image", str(blue), "--out", str(tmp_path / "x")]) == 2
    assert "images: 2 images for 1 prompts" in capsys.readouterr().err
    a14b = family_dirs("wan22_a14b")
    capsys.readouterr()  # the folder's build output
    assert main(["sample", "--model", "wan22", "--model-path", a14b, "--prompt", "a ball", "--image", str(red),
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "prompts: 1 prompts name an image, but the 'wan22' model takes none" in err, err


def test_the_frozen_experts_transitions_are_dropped_and_guidance_scale_2_is_configured(family_dirs):
    """model.train_experts=low_noise: the high-noise expert's transitions have a ratio of exactly 1
    and no gradient, so the trainers drop them; model.guidance_scale_2 reaches the adapter."""
    from align.models import ModelConfig, load_model
    from align.sampling.rollout import RolloutConfig, rollout
    from align.trainers.scoring import trained_transitions

    adapter = load_model(ModelConfig(name="wan22", path=family_dirs("wan22_a14b"), device="cpu", dtype="float32",
                                     height=32, width=32, num_frames=5, train_experts="low_noise",
                                     guidance_scale_2=1.5))
    cond = adapter.encode(["a red digit 3"], "", 3.0)
    assert adapter.guidance_scale_2 == 1.5 and cond.extra["guidance_scale_2"] == 1.5
    with torch.no_grad():
        result = rollout(adapter, cond, RolloutConfig(num_steps=4, kernel="flow_grpo"),
                         generator=torch.Generator().manual_seed(0), height=32, width=32, num_frames=5)
    assert [t.expert for t in result.transitions] == [0, 1, 1, 1]
    assert [t.step for t in trained_transitions(adapter, result.transitions)] == [1, 2, 3]
    both = load_model(ModelConfig(name="wan22", path=family_dirs("wan22_a14b"), device="cpu", dtype="float32"))
    assert trained_transitions(both, result.transitions) == result.transitions


def test_align_label_keeps_each_prompts_image(family_dirs, tmp_path):
    """Image-to-video pairs to judge: the images travel with their prompts into the label folder and
    back (D3PO re-scores the pairs as they were sampled), and the page shows a frame past the given
    one."""
    from PIL import Image

    from align.config import load_config
    from align.commands.label import write_label_set
    from align.labels import read_labels
    from align.models import ModelConfig, load_model
    from align.trainers import trainer_module

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "first.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red ball rolls", "image": "first.png"}\n')
    config = load_config(trainer_module("d3po").CONFIG, None, [
        "model.name=wan22", f"model.path={family_dirs('wan22_i2v')}", "model.height=64", "model.width=64",
        "model.num_frames=5", f"prompt_file={prompts}", "rollout.num_steps=2", "rollout.guidance_scale=3.0"])
    adapter = load_model(ModelConfig(name="wan22", path=family_dirs("wan22_i2v"), device="cpu", dtype="float32",
                                     height=64, width=64, num_frames=5))
    out = write_label_set(adapter, config, tmp_path / "labels", pairs=1)
    lines = (out / "pairs.jsonl").read_text().replace('"preferred": null', '"preferred": "a"')
    (out / "pairs.jsonl").write_text(lines)
    labels = read_labels(out / "pairs.jsonl")
    assert labels.prompts == ["a red ball rolls"] and labels.prompts[0].image == str(tmp_path / "first.png")
    a, b = Image.open(out / "pair-0000-a.png"), Image.open(out / "pair-0000-b.png")
    assert a.tobytes() != b.tobytes(), "the two sides show different frames (not the shared first one)"


def test_align_sample_edits_the_given_sources(family_dirs, tmp_path, capsys):
    """``align sample --image`` on editing models: the toy edit model redraws its source (a black source
    and a red one give other edits), ``a,b`` gives one prompt two sources (Qwen-Image-Edit Plus), and an
    editing-only model without a source is one line."""
    from PIL import Image

    from align.commands.cli import main

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(red)
    Image.new("RGB", (64, 64), (30, 30, 220)).save(blue)
    outs = []
    for image in (red, blue):
        out = tmp_path / f"toy_{image.stem}"
        assert main(["sample", "--model", "toy_edit", "--prompt", "make it thinner", "--image", str(image), "--num",
                     "1", "--steps", "4", "--out", str(out)]) == 0
        outs.append((out / "0000.png").read_bytes())
    assert outs[0] != outs[1]
    plus = ["sample", "--model", "qwen_image_edit", "--model-path", family_dirs("qwen_image_edit_plus"), "--prompt",
            "put them together", "--num", "1", "--steps", "2", "--device", "cpu", "model.height=32", "model.width=32",
            "model.source_size=64"]
    assert main([*plus, "--image", f"{red},{blue}", "--out", str(tmp_path / "plus")]) == 0
    assert (tmp_path / "plus" / "0000.png").is_file()
    capsys.readouterr()
    assert main([*plus, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the 'qwen_image_edit' model edits an image" in err, err
