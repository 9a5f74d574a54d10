"""Diffusion-DPO / Flow-DPO: the loss's closed forms, the pair file format, one optimisation step
favouring the winner, and the trainer's first update at ln 2 (LoRA starts as the reference)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from align.config import ConfigError
from align.losses import diffusion_dpo_loss
from align.trainers.denoising import DenoisingConfig, denoising_errors, draw_levels
from align.trainers.dpo import best_and_worst, read_pairs
from tests.conftest import GaussianAdapter, GaussianDDPMAdapter


def test_loss_is_ln2_at_the_reference_and_swapping_flips_the_inside_term():
    errors = torch.rand(4, 6)
    loss, inside = diffusion_dpo_loss(*errors[:4], beta=5000.0)
    swapped_loss, swapped = diffusion_dpo_loss(errors[1], errors[0], errors[3], errors[2], beta=5000.0)
    torch.testing.assert_close(swapped, -inside)
    # model = reference: inside 0, loss ln 2 whatever the errors
    same, zero = diffusion_dpo_loss(errors[0], errors[1], errors[0], errors[1], beta=5000.0)
    torch.testing.assert_close(same, torch.full((6,), math.log(2)))
    assert float(zero.abs().max()) == 0
    # a known value: the winner's error fell by 0.002 against the reference, beta 5000 with the 1/2
    loss, inside = diffusion_dpo_loss(torch.tensor([0.098]), torch.tensor([0.1]), torch.tensor([0.1]),
                                      torch.tensor([0.1]), beta=5000.0)
    assert float(inside) == pytest.approx(5.0, rel=1e-4) and float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-5.0))), rel=1e-4)


@pytest.mark.parametrize("make_adapter", [GaussianAdapter, GaussianDDPMAdapter], ids=["flow", "eps"])
def test_one_step_lowers_the_winners_error_relative_to_the_losers(make_adapter):
    torch.manual_seed(0)
    model = make_adapter(shape=(2, 3, 3))
    with torch.no_grad():
        model.denoiser.gain.fill_(0.8)  # not the exact model: the pair's errors differ
    reference = copy.deepcopy(model)
    schedule = model.schedule(1000)
    cond = model.encode(["0.5", "0.5"], guidance_scale=1.0)
    winner, loser = torch.full((1, 2, 3, 3), 0.5), torch.full((1, 2, 3, 3), 0.9)
    x0 = torch.cat([winner, loser])
    generator = torch.Generator().manual_seed(1)
    index = draw_levels(schedule, 1, DenoisingConfig(), generator).repeat(2)
    noise = torch.randn(1, 2, 3, 3, generator=generator).repeat(2, 1, 1, 1)

    def margin(adapter):
        errors = denoising_errors(adapter, x0, cond, schedule, index, noise)
        return errors[0] - errors[1]

    before = float(margin(model))
    optimizer = torch.optim.SGD(model.denoiser.parameters(), lr=1e-3)
    errors = denoising_errors(model, x0, cond, schedule, index, noise)
    with torch.no_grad():
        ref = denoising_errors(reference, x0, cond, schedule, index, noise)
    loss, inside = diffusion_dpo_loss(errors[:1], errors[1:], ref[:1], ref[1:], beta=100.0)
    assert float(loss) == pytest.approx(math.log(2)) and float(inside) == 0
    loss.mean().backward()
    optimizer.step()
    assert float(margin(model)) < before


def write_pair_file(tmp_path, lines):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" if isinstance(line, dict) else line + "\n" for line in lines))
    return str(path)


def test_the_pair_file_format(tmp_path):
    path = write_pair_file(tmp_path, [
        {"prompt": "p1", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": "p2", "chosen": "a.png", "rejected": "b.png", "label": 0},
        {"prompt": "tie", "chosen": "a.png", "rejected": "b.png", "label": 0.5},
        "",
    ])
    pairs = read_pairs(path)
    assert [(p.prompt, p.chosen.name, p.rejected.name) for p in pairs] == [("p1", "a.png", "b.png"),
                                                                            ("p2", "b.png", "a.png")]
    assert pairs[0].chosen == tmp_path / "a.png"  # relative to the file's folder


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "p", "chosen": "a.png", "rejected": "missing.png"}, "line 2: image not found: "),
    ({"prompt": "p", "chosen": "a.png"}, "line 2: expected a JSON object with prompt, chosen, rejected"),
    ("{not json", "line 2: expected a JSON object"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "b.png", "label": 2}, "line 2: label must be 1"),
])
def test_a_bad_pair_line_names_the_file_and_line(line, expected, tmp_path):
    path = write_pair_file(tmp_path, [{"prompt": "ok", "chosen": "a.png", "rejected": "b.png"}, line])
    with pytest.raises(ConfigError, match=expected) as err:
        read_pairs(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_online_pairs_are_the_best_and_worst_of_each_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 0.2, 0.8])
    valid = torch.tensor([True, False, True, True, True, True, True, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    # group 0: row 1 is unscored, so 2 beats 0; group 1 is all equal: no pair
    assert best_and_worst(scores, valid, groups) == ([2, 7], [0, 6])


def test_the_first_update_starts_at_ln2_and_logs_the_implicit_accuracy(tmp_path):
    from pipelines.toy import TOY_WEIGHTS_DIR

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    from align.config import load_config
    from align.trainers import dpo

    config = load_config(dpo.CONFIG, None, [
        "model.name=toy", "iterations=2", "prompts_per_iteration=2", "group_size=4", "rollout.num_steps=3",
        "eval.per_prompt=1", "eval_prompts=['a red digit 3']", "beta=30", f"run.output_dir={tmp_path}",
        "run.log_with=none", "run.progress=false", "run.checkpoint_every=0"])
    dpo.train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: model = reference
    assert first["train/implicit_accuracy"] == 0.0 and first["train/pairs"] == 2.0
    assert "train/reward_margin" in first


def test_a_missing_pair_file_is_one_line(tmp_path):
    from align.commands.cli import main

    assert main(["train", "dpo", "pairs=missing.jsonl", f"run.output_dir={tmp_path}"]) == 2


#: offline DPO on the pairs below, training seeds 0-4 (evaluation gains after - before)
OFFLINE_GAINS = (0.0352, 0.0290, 0.0358, 0.0396, 0.0257)


def toy_pairs(out, prompts, per_prompt: int = 32, seed: int = 123):
    """Pairs the toy model generated and the digit reward ranked: per prompt, its best half of
    ``per_prompt`` ODE samples against its worst half, written as PNGs and the JSONL of
    docs/preference_pairs.md."""
    from torchvision.transforms.functional import to_pil_image

    from align.models import ModelConfig, load_model
    from align.commands.sample import SampleConfig, generate
    from align.sampling.rollout import RolloutConfig
    from rewards.registry import build_reward

    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(ModelConfig(name="toy", device="cpu"))
    config = SampleConfig(model=ModelConfig(name="toy"), prompts=list(prompts), num_per_prompt=per_prompt, seed=seed,
                          rollout=RolloutConfig(kernel="ode", num_steps=6, guidance_scale=1.0))
    pixels, sample_prompts, _ = generate(adapter, config)
    scores = build_reward("digit")(pixels, sample_prompts).total
    lines = []
    for prompt in prompts:
        ranked = sorted((i for i, p in enumerate(sample_prompts) if p == prompt), key=lambda i: -float(scores[i]))
        for k in range(per_prompt // 2):
            w, lo = ranked[k], ranked[-1 - k]
            for i in (w, lo):
                to_pil_image(pixels[i]).save(out / f"{i:04d}.png")
            lines.append(json.dumps({"prompt": prompt, "chosen": f"{w:04d}.png", "rejected": f"{lo:04d}.png"}))
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return out / "pairs.jsonl"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_offline_dpo_on_pairs_the_toy_model_generated_raises_the_reward(tmp_path):
    import statistics

    from pipelines.toy import TOY_WEIGHTS_DIR

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    from tests.test_toy_reward_rise import HARD_PROMPTS, toy_run_config

    pairs = toy_pairs(tmp_path / "pairs", HARD_PROMPTS)
    assert len(read_pairs(str(pairs))) == 64  # written to the documented format and read back
    config = toy_run_config("dpo", "digit", 0, tmp_path / "run")
    config.pairs, config.optim.lr = str(pairs), 1e-3  # offline: a smaller step on the fixed pairs
    from align.trainers import dpo

    summary = dpo.train(config)
    gain = summary["reward_after"] - summary["reward_before"]
    required = max(statistics.stdev(OFFLINE_GAINS), 0.5 * statistics.mean(OFFLINE_GAINS))
    assert gain > required, (gain, OFFLINE_GAINS)


def test_relabelling_reranks_each_pair_by_the_reward_and_drops_its_ties(tmp_path):
    """A reward for red: the pair the file ranks blue over red is flipped, the tie is dropped."""
    from types import SimpleNamespace

    from PIL import Image

    from align.trainers.dpo import DPOConfig, offline_batch
    from rewards.base import REWARDS, Reward, register_reward
    from rewards.registry import build_reward
    from tests.conftest import GaussianAdapter

    if "test_redness" not in REWARDS:
        @register_reward("test_redness")
        class Redness(Reward):
            def score(self, samples, prompts, **context):
                return {"score": samples[:, 0].mean(dim=(1, 2))}

    # files of other sizes than the run's 4 x 4: fitted (cover, centre crop) before encoding
    for name, colour, size in (("red.png", (250, 0, 0), (4, 4)), ("blue.png", (0, 0, 250), (8, 6)),
                               ("blue2.png", (0, 0, 250), (5, 9))):
        Image.new("RGB", size, colour).save(tmp_path / name)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "chosen": "blue.png", "rejected": "red.png"}) + "\n"
                    + json.dumps({"prompt": "p2", "chosen": "blue.png", "rejected": "blue2.png"}) + "\n")

    class PixelAdapter(GaussianAdapter):
        def encode_images(self, images):
            return images * 2 - 1

    run = SimpleNamespace(adapter=PixelAdapter(shape=(3, 4, 4)), latent_kwargs={"height": 4, "width": 4},
                          accelerator=SimpleNamespace(num_processes=1, process_index=0))
    config = DPOConfig(pairs=str(path), pairs_per_iteration=2, relabel=True)
    winners, losers, prompts = offline_batch(run, config, read_pairs(str(path)), build_reward("test_redness"), 0)
    assert prompts == ["p1"]  # the all-blue pair is a tie under the reward
    assert float(winners[0, 0].mean()) > 0.9 and float(losers[0, 0].mean()) < -0.9  # red won
    config.relabel = False
    winners, _, prompts = offline_batch(run, config, read_pairs(str(path)), None, 0)
    assert len(prompts) == 2 and {float(w[2].mean()) > 0.9 for w in winners} == {True}  # as the file says: blue
    assert winners.shape == (2, 3, 4, 4)


def test_fit_to_size_covers_then_crops_the_centre():
    from align.trainers.denoising import fit_to_size

    image = torch.zeros(3, 8, 16)
    image[:, :, 2:14] = 1.0  # the centre of the width (its edges blur when downscaled)
    fitted = fit_to_size(image, 4, 4)  # 8 x 16 -> 4 x 8 -> the centre 4 x 4 (columns 4-11 of 16)
    assert fitted.shape == (3, 4, 4) and float(fitted.min()) > 0.99


def test_each_process_trains_its_own_offline_pairs(tmp_path):
    from types import SimpleNamespace

    from align.trainers.dpo import DPOConfig, offline_batch
    from tests.conftest import GaussianAdapter

    class PixelAdapter(GaussianAdapter):
        def encode_images(self, images):
            return images * 2 - 1

    path = write_pair_file(tmp_path, [{"prompt": f"p{i}", "chosen": "a.png", "rejected": "b.png"} for i in range(4)])
    pairs = read_pairs(path)
    config = DPOConfig(pairs=path, pairs_per_iteration=2)

    def prompts(process, iteration=0):
        run = SimpleNamespace(adapter=PixelAdapter(shape=(3, 4, 4)), latent_kwargs={"height": 4, "width": 4},
                              accelerator=SimpleNamespace(num_processes=2, process_index=process))
        return offline_batch(run, config, pairs, None, iteration)[2]

    first, second = prompts(0), prompts(1)
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert sorted(first + second) == ["p0", "p1", "p2", "p3"]  # one pass over the file per iteration
