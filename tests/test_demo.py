"""The Gradio demo, launched in-process and driven through gradio_client like any remote user: its
scores equal the rewards called directly on the same samples, a reward that cannot load shows its
error instead of crashing, uploads and run folders are read."""

from __future__ import annotations

import json

import pytest
import torch

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

PROMPTS = ["a red digit 3", "a blue digit 8"]


def make_run_folder(root, name="trained", model="toy"):
    """A run folder whose lora/ export moves the toy model visibly (random LoRA weights)."""
    from align.models import ModelConfig, load_model

    folder = root / name
    adapter = load_model(ModelConfig(name=model))
    adapter.add_lora(rank=4, alpha=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in adapter.base_denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapter.export_lora(folder / "lora")
    (folder / "run.json").write_text(json.dumps({"trainer": "flow_grpo", "config": "config.yaml"}))
    rows = [{"iteration": 0, "eval/reward": 0.80, "eval/heldout/digit_judge": 0.90, "nfe": 0, "wall_s": 0.0},
            {"iteration": 5, "reward/mean": 0.83, "nfe": 1600},
            {"iteration": 10, "eval/reward": 0.91, "eval/heldout/digit_judge": 0.85, "nfe": 3200, "wall_s": 12.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from demos.app import DemoSettings, build_app

    root = tmp_path_factory.mktemp("runs")
    run = make_run_folder(root)
    app = build_app(DemoSettings(runs=root))
    app.launch(prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(app.local_url, verbose=False)
    yield app, client, run
    app.close()


def shown(output):
    """(value, visible) of an output the event may show or hide (gr.update)."""
    return output["value"], output["visible"]


def table_rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def direct_scores(checkpoint_lora, rewards, per_prompt=2, seed=3):
    """The same samples as the demo's, generated and scored without the demo."""
    from align.models import ModelConfig, load_model
    from align.commands.sample import SampleConfig, generate
    from rewards import build_reward

    adapter = load_model(ModelConfig(name="toy"))
    if checkpoint_lora is not None:
        adapter.load_lora(checkpoint_lora)
    config = SampleConfig(prompts=PROMPTS, num_per_prompt=per_prompt, seed=seed)
    config.rollout.num_steps, config.rollout.guidance_scale, config.rollout.kernel = 10, 1.0, "ode"
    pixels, prompts, _ = generate(adapter, config)
    return {name: build_reward(name)(pixels, prompts).total.tolist() for name in rewards}, prompts


def test_compare_returns_the_rewards_own_scores_per_checkpoint(served):
    app, client, run = served
    rewards = ["digit", "digit_judge", "stroke_thickness"]
    gallery, table, chart, slider, pair_video, _, errors = client.predict(
        "\n".join(PROMPTS), "toy", ["base", str(run)], rewards, 3, 10, 1.0, "ode", 2, "", 0, 0, 0,
        api_name="/compare")
    rows = table_rows(table)
    assert errors == ""
    assert len(rows) == 2 * 2 * len(PROMPTS) and len(gallery) == len(rows)
    for checkpoint, lora in (("base", None), (run.name, run / "lora")):
        expected, prompts = direct_scores(lora, rewards)
        mine = [r for r in rows if r["checkpoint"] == checkpoint]
        assert [r["prompt"] for r in mine] == prompts
        for name in rewards:
            assert [r[name] for r in mine] == pytest.approx(expected[name], abs=2e-6), (checkpoint, name)
    base = [r["stroke_thickness"] for r in rows if r["checkpoint"] == "base"]
    trained = [r["stroke_thickness"] for r in rows if r["checkpoint"] == run.name]
    assert base != pytest.approx(trained, abs=1e-3)  # the LoRA is active for its checkpoint only
    (pair, slider_visible), (video, video_visible) = shown(slider), shown(pair_video)
    assert len(pair) == 2 and slider_visible and video is None and not video_visible  # images: the slider


def test_a_reward_that_cannot_load_shows_its_error_and_the_others_still_score(served):
    app, client, run = served
    _, table, _, _, _, _, errors = client.predict(
        PROMPTS[0], "toy", ["base"], ["aesthetic", "digit"], 0, 4, 1.0, "ode", 1, "", 0, 0, 0, api_name="/compare")
    assert "aesthetic" in errors and "head_path" in errors
    assert "digit" in table["headers"] and "aesthetic" not in table["headers"]


def test_score_files_scores_uploaded_images_like_the_reward(served, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    from demos.app import load_media
    from rewards import build_reward

    app, client, run = served
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"up{i}.png"
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(path)
        paths.append(path)
    table, errors = client.predict([handle_file(str(p)) for p in paths], "a red digit 3", ["digit", "colour"],
                                   api_name="/score_files")
    rows = table_rows(table)
    pixels = load_media(paths)
    for name in ("digit", "colour"):
        expected = build_reward(name)(pixels, ["a red digit 3"] * 3).total.tolist()
        assert [r[name] for r in rows] == pytest.approx(expected, abs=2e-6)


def test_run_info_shows_the_runs_before_after_table(served):
    app, client, run = served
    markdown, curve, image = client.predict(str(run), api_name="/run_info")
    assert "| reward | 0.8000 | 0.9100 | +0.1100 |" in markdown
    assert "| heldout/digit_judge | 0.9000 | 0.8500 | -0.0500 |" in markdown
    assert str(run) in str(client.predict(api_name="/list_runs"))


def test_videos_play_in_the_gallery_and_side_by_side_with_their_dimensions(served, tmp_path):
    """Base and trained videos: each plays in the gallery captioned with every dimension's score, and
    the first of each plays side by side (one MP4 twice as wide plus the divider) above both rows of
    scores, the same numbers as the table's."""
    import imageio.v3 as iio

    app, client, run = served
    trained = make_run_folder(tmp_path, "trained_video", model="toy_video")
    gallery, table, _, slider, pair_video, pair_text, errors = client.predict(
        "a red digit 3 moving left", "toy_video", ["base", str(trained)], ["motion", "consistency"], 0, 4, 1.0,
        "ode", 1, "", 0, 0, 0, api_name="/compare")
    assert errors == ""
    assert str(gallery[0]["video"]).endswith(".mp4") and "motion.direction=" in gallery[0]["caption"]
    assert {"motion.direction", "motion.smoothness", "motion", "consistency.identity",
            "consistency.colour"} <= set(table["headers"])
    (pair, slider_visible), (video, video_visible) = shown(slider), shown(pair_video)
    assert pair is None and not slider_visible and video_visible  # videos: side by side, the slider hidden
    frames = iio.imread(video["video"] if isinstance(video, dict) else video)
    single = iio.imread(gallery[0]["video"])
    assert frames.shape[0] == single.shape[0] and frames.shape[2] > 2 * single.shape[2]
    base, after = table_rows(table)
    assert f"consistency.identity={base['consistency.identity']:.3f}" in pair_text.split("right:")[0]
    assert f"motion.direction={after['motion.direction']:.3f}" in pair_text.split("right:")[1]


def test_edit_tab_shows_the_source_then_each_checkpoints_edits_scored_like_the_rewards(served, tmp_path):
    """An uploaded source edited by the base toy_edit model and a trained LoRA: the gallery opens with
    the source, every edit's scores are the edit rewards called on the same edits and source, and
    the base and trained first edits face each other on the slider."""
    from gradio_client import handle_file

    from align.commands.sample import SampleConfig, generate
    from align.models import ModelConfig, load_model
    from demos.app import edit_examples, source_tensor
    from pipelines.base import Prompt
    from rewards import build_reward

    app, client, _ = served
    run = make_run_folder(tmp_path, "edit_trained", model="toy_edit")
    source_path, _ = edit_examples()[0]
    instructions = ["make it blue", "make it thicker"]
    rewards = ["edit_instruction", "preservation"]
    gallery, table, _, slider, errors = client.predict(
        handle_file(source_path), "\n".join(instructions), "toy_edit", ["base", str(run)], rewards, 3, 10, 3.0, 1,
        api_name="/edit")
    rows = table_rows(table)
    assert errors == "" and len(rows) == 2 * len(instructions) and len(gallery) == 1 + len(rows)
    assert gallery[0]["caption"] == "source"
    adapter = load_model(ModelConfig(name="toy_edit"))
    source = source_tensor(source_path)
    config = SampleConfig(prompts=[Prompt(i, source) for i in instructions], num_per_prompt=1, seed=3)
    config.rollout.num_steps, config.rollout.guidance_scale, config.rollout.kernel = 10, 3.0, "ode"
    pixels, prompts, _ = generate(adapter, config)
    for name in rewards:
        expected = build_reward(name)(pixels, prompts).total.tolist()
        assert [r[name] for r in rows if r["checkpoint"] == "base"] == pytest.approx(expected, abs=2e-5), name
    assert len(slider) == 2
    with pytest.raises(Exception, match="give a source image"):
        client.predict(None, "make it blue", "toy_edit", ["base"], rewards, 0, 4, 3.0, 1, api_name="/edit")
