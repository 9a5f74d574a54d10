"""The embedded toy flow model, its adapter and the digit-classifier reward (shipped weights)."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.base import Conditioning
from pipelines.toy import (COLOURS, NUMBER_WORDS, PAD, UNK, VOCAB, ToyAdapter, ToyTokenizer,
                           colour_digits, digit_split, load_toy_adapter, toy_prompt)
from rewards.digit_classifier import (colour_probability, digit_probability, digit_reward, load_digit_classifier,
                                      parse_prompt, predict_digits, stroke_colour)


@pytest.fixture(scope="module")
def adapter() -> ToyAdapter:
    return load_toy_adapter()


def euler_sample(adapter: ToyAdapter, prompts, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = adapter.initial_noise(len(prompts), generator=g)
    cond = adapter.encode(prompts, guidance_scale=guidance)
    sched = adapter.schedule(steps)
    with torch.no_grad():
        for i in range(len(sched)):
            v = adapter.predict(x, sched.timesteps[i], cond)
            x = x + v * (sched.levels[i + 1] - sched.levels[i])
    return adapter.decode(x)


# --- (a) tokenizer and prompts ----------------------------------------------------------------------

def test_tokenizer_round_trip_and_unknown_words():
    tok = ToyTokenizer()
    assert len(set(VOCAB)) == len(VOCAB) and VOCAB[0] == PAD
    ids = tok(["a red digit 7", "A RED, digit-7!", "the number seven in blue"])
    assert ids.shape == (3, tok.max_length) and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "a red digit 7"
    assert torch.equal(ids[0], ids[1])
    assert tok.decode(ids[2]) == "the number seven in blue"
    purple = tok("a purple digit 7")[0]
    assert purple[1].item() == tok.unk_id and tok.decode(purple) == f"a {UNK} digit 7"
    assert tok("a 17")[0, 1].item() == tok.unk_id
    assert torch.equal(tok(""), torch.zeros(1, tok.max_length, dtype=torch.long))
    assert (tok(" ".join(["a"] * 40)) != tok.pad_id).sum() == tok.max_length      # truncated
    for d in range(10):
        for c in COLOURS:
            assert UNK not in tok.decode(tok(toy_prompt(d, c, template=3, word=True))[0])


def test_parse_prompt():
    assert parse_prompt("a red digit 7") == (7, "red")
    assert parse_prompt("the number seven in Blue") == (7, "blue")
    assert parse_prompt("a drawing of a cyan number 0 on a black background") == (0, "cyan")
    assert parse_prompt("a digit nine") == (9, None)
    assert parse_prompt("an orange digit") == (None, "orange")
    assert parse_prompt("") == (None, None)
    for d in range(10):
        assert parse_prompt(toy_prompt(d, "white", template=d % 5, word=d % 2 == 1)) == (d, "white")


# --- (b) shipped model and adapter -------------------------------------------------------------------

def test_adapter_shapes_schedule_decode(adapter):
    assert adapter.name == "toy" and adapter.prediction_type == "flow"
    assert adapter.latent_shape() == (3, adapter.default_height, adapter.default_width) == (3, 16, 16)
    n_params = sum(p.numel() for p in adapter.denoiser.parameters())
    assert 5e5 < n_params < 2e6

    cond = adapter.encode(["a red digit 7", "a blue digit three"])
    assert isinstance(cond, Conditioning) and len(cond) == 2 and cond.uses_cfg
    assert cond.guidance_scale == adapter.default_guidance
    assert (cond.negative["input_ids"] == 0).all()
    assert adapter.encode(["a red digit 7"], guidance_scale=1.0).negative is None

    sched = adapter.schedule(adapter.default_steps)
    assert len(sched) == adapter.default_steps and sched.kind == "flow"
    assert sched.levels.shape == (adapter.default_steps + 1,) and sched.levels.dtype == torch.float32
    assert sched.levels[0] == 1 and sched.levels[-1] == 0 and (sched.levels.diff() < 0).all()
    assert torch.allclose(sched.timesteps, sched.levels[:-1] * 1000)

    x = adapter.initial_noise(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16)
    nfe = adapter.nfe
    with torch.no_grad():
        v = adapter.predict(x, sched.timesteps[0], cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert adapter.nfe == nfe + 2
    img = adapter.decode(x * 3)
    assert img.shape == x.shape and img.min() >= 0 and img.max() <= 1


def test_save_load_round_trip(adapter, tmp_path):
    adapter.denoiser.save_pretrained(str(tmp_path), safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    other = load_toy_adapter(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    ids = adapter.tokenizer(["a red digit 7", ""])
    t = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        assert torch.equal(adapter.denoiser(x, t, ids), other.denoiser(x, t, ids))


# --- (c) LoRA and the reference policy ----------------------------------------------------------------

def test_lora_and_disable_adapter():
    adapter = load_toy_adapter()            # its own copy: LoRA is injected in place
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = adapter.encode(["a red digit 7", "a green 2", "the number five in white"])
    t = torch.tensor(600.0)
    with torch.no_grad():
        base = adapter.predict(x, t, cond)

    adapter.add_lora(rank=4, alpha=4)
    lora_params = {n: p for n, p in adapter.denoiser.named_parameters() if "lora_" in n}
    assert lora_params and {p.requires_grad for p in lora_params.values()} == {True}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_params} >= {"to_q", "to_k", "to_v", "0"}
    trainable = adapter.trainable_parameters()
    assert len(trainable) == len(lora_params)
    with torch.no_grad():
        same = adapter.predict(x, t, cond)       # lora_B starts at zero
        assert torch.allclose(same, base, atol=1e-6)
        g = torch.Generator().manual_seed(2)
        for n, p in lora_params.items():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        tuned = adapter.predict(x, t, cond)
        assert (tuned - base).abs().max() > 1e-3
        with adapter.disable_adapter():
            ref = adapter.predict(x, t, cond)
        assert torch.allclose(ref, base, atol=1e-6)
        assert torch.allclose(adapter.predict(x, t, cond), tuned, atol=1e-6)    # re-enabled


# --- (d) the acceptance test: the shipped model draws the digits it is asked for -----------------------

def test_samples_are_the_requested_digits_and_colours(adapter):
    digits = [d for _ in range(10) for d in range(10)]
    colours = [COLOURS[(3 * k + d) % len(COLOURS)] for k in range(10) for d in range(10)]
    prompts = [toy_prompt(d, c, template=i % 4, word=(i // 4) % 2 == 1)
               for i, (d, c) in enumerate(zip(digits, colours))]
    images = euler_sample(adapter, prompts, adapter.default_steps, adapter.default_guidance, seed=0)
    assert images.shape == (100, 3, 16, 16)
    acc = (predict_digits(images) == torch.tensor(digits)).float().mean().item()
    assert acc >= 0.8, f"classifier finds the requested digit in only {acc:.0%} of the samples"
    colour_acc = (colour_probability(images, colours) > 0.5).float().mean().item()
    assert colour_acc >= 0.9, f"only {colour_acc:.0%} of the samples have the requested colour"
    assert digit_reward(images, prompts).mean() > 0.7


# --- (e) the classifier on real held-out digits --------------------------------------------------------

def test_classifier_on_held_out_digits():
    _, _, test_x, test_y = digit_split()
    colour_ids = torch.arange(len(test_y)) % len(COLOURS)
    images = colour_digits(test_x, colour_ids, size=16)
    acc = (predict_digits(images) == test_y).float().mean().item()
    assert acc > 0.9, acc
    # other sizes, grey images and the colour read-out
    big = torch.nn.functional.interpolate(images[:64], size=64, mode="bilinear", align_corners=False)
    assert (predict_digits(big) == test_y[:64]).float().mean() > 0.9
    assert (predict_digits(images[:64].mean(1, keepdim=True).repeat(1, 3, 1, 1) * 1.5) == test_y[:64]
            ).float().mean() > 0.9
    named = [COLOURS[int(i)] for i in colour_ids]
    assert (colour_probability(images, named) > 0.5).float().mean() > 0.95
    assert torch.allclose(stroke_colour(images).amax(1), torch.ones(len(images)))


def test_digit_probability_is_differentiable():
    classifier = load_digit_classifier()
    assert not any(p.requires_grad for p in classifier.parameters())
    _, _, test_x, test_y = digit_split()
    images = colour_digits(test_x[:8], torch.arange(8), size=16).requires_grad_(True)
    p = digit_probability(images, test_y[:8])
    assert p.shape == (8,) and ((p >= 0) & (p <= 1)).all()
    p.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert digit_probability(images.detach(), 3).shape == (8,)
    words = [toy_prompt(int(d), "red", word=True) for d in test_y[:8]]
    assert all(w.split()[-1] in NUMBER_WORDS for w in words)
    assert torch.allclose(digit_reward(images.detach(), words), digit_probability(images.detach(), test_y[:8]))


def test_lora_target_modules_choose_the_adapted_layers(tmp_path):
    from align.config import ConfigError, load_config
    from align.training.run import Run
    from align.trainers import trainer_module

    def run_with(targets):
        config = load_config(trainer_module("flow_grpo").CONFIG, None, [
            "model.name=toy", f"lora.target_modules={targets}", "run.log_with=none", "run.resume=null",
            f"run.output_dir={tmp_path}"])
        return Run(config, model=config.model, lora=config.lora, optim=config.optim, run=config.run)

    run = run_with("[to_q]")
    names = [n for n, p in run.adapter.base_denoiser.named_parameters() if p.requires_grad]
    assert names and all(".to_q.lora_" in n for n in names)
    with pytest.raises(ConfigError, match=r"lora.target_modules \['to_qq'\].*to_q"):
        run_with("[to_qq]")


def test_a_run_writes_tensorboard_scalars_grids_config_and_metrics(tmp_path):
    """The default tracker (tensorboard, offline) gets every per-step metric and the evaluation grids
    as images; sample grids every ``sample_every`` iterations; the resolved config and metrics.jsonl
    in the run folder."""
    import json

    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from align.config import load_config
    from align.trainers import trainer_module

    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "iterations=2", "prompts_per_iteration=2", "group_size=4", "rollout.num_steps=4",
        "run.sample_every=1", "eval.per_prompt=2", "eval_prompts=['a red digit 3']", "run.resume=null",
        "run.progress=false", "run.checkpoint_every=0", "heldout_rewards=[jpeg_compressibility]",
        f"run.output_dir={tmp_path}"])
    module.train(config)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    scalars = set()
    images = {}
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        images.update({tag: accumulator.Images(tag) for tag in accumulator.Tags()["images"]})
    for tag in ("reward/score/mean", "reward/score/std", "advantage/abs_mean", "train/approx_kl",
                "train/clip_fraction", "train/ratio_mean", "nfe", "time/sampling", "time/reward", "time/training",
                "eval/reward", "eval/heldout/jpeg_compressibility", "eval/diversity"):
        assert tag in scalars, tag
    from PIL import Image

    for grid, step in (("before", 0), ("iteration-000001", 1), ("iteration-000002", 2), ("after", 2)):
        assert (tmp_path / "samples" / grid / "grid.png").exists(), grid
        # the tracker holds the same grid as an image, at the iteration it was made
        (logged,) = images[f"samples/{grid}"]
        width, height = Image.open(tmp_path / "samples" / grid / "grid.png").size
        assert (logged.step, logged.width, logged.height) == (step, width, height), grid
    assert OmegaConf.load(tmp_path / "config.yaml").group_size == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nfe"] for r in rows if "nfe" in r and "eval/reward" not in r] == [2 * 4 * 4, 4 * 4 * 4]
    # evaluations carry the compute spent to reach them: before, every iteration (sample_every=1), after
    assert [(r["nfe"], r["iteration"]) for r in rows if "eval/reward" in r] == [(0, 0), (32, 1), (64, 2), (64, 2)]


def test_wandb_offline_gets_the_evaluation_grids(tmp_path, monkeypatch):
    """``run.log_with=wandb`` (offline: no account, no network) records the run, with the evaluation
    grids as images equal to the run folder's grid.png (the scalars go through the same
    ``accelerator.log`` as tensorboard's, tested above)."""
    pytest.importorskip("wandb")
    import numpy as np
    from PIL import Image

    from align.config import load_config
    from align.trainers import trainer_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "iterations=1", "prompts_per_iteration=1", "group_size=2", "rollout.num_steps=3",
        "eval.per_prompt=1", "eval_prompts=['a red digit 3']", "run.resume=null", "run.progress=false",
        "run.checkpoint_every=0", "run.log_with=wandb", f"run.output_dir={tmp_path / 'run'}"])
    module.train(config)
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(folder.glob("run-*.wandb"))
    media = {p.name.split("_")[0]: p for p in (folder / "files" / "media" / "images" / "samples").glob("*.png")}
    assert sorted(media) == ["after", "before"], media
    for name, path in media.items():
        grid = np.asarray(Image.open(tmp_path / "run" / "samples" / name / "grid.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), grid), name
