"""Registry, construction from config, the weighted combination, entry points and ``align score``."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import torch

from align.commands.cli import main
from align.config import ConfigError
from pipelines.toy import COLOURS, colour_digits, digit_split, toy_prompt
from rewards import CombinedReward, Reward, available_rewards, build_reward, build_rewards
from rewards.base import REWARDS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    _, _, images, labels = digit_split()
    colour_ids = torch.arange(6) % len(COLOURS)
    x = colour_digits(images[:6], colour_ids, size=32)
    prompts = [toy_prompt(int(d), COLOURS[int(c)]) for d, c in zip(labels[:6], colour_ids)]
    return x, prompts


def test_builtin_rewards_are_registered():
    names = available_rewards()
    for name in ("aesthetic", "clip_score", "pickscore", "hpsv2", "jpeg_compressibility", "ocr", "digit", "colour",
                 "stroke_thickness"):
        assert name in names


def test_unknown_name_and_option_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        build_reward("aesthetics")
    assert "unknown reward 'aesthetics'" in str(err.value) and "did you mean 'aesthetic'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_reward({"name": "stroke_thickness", "thiner": True})
    assert "unknown option of reward 'stroke_thickness' 'thiner'" in str(err.value)
    assert "did you mean 'thinner'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="dimension of reward 'digit' 'scor'"):
        build_reward({"name": "digit", "weights": {"scor": 2.0}})
    with pytest.raises(ConfigError, match="has no 'name'"):
        build_reward({"weight": 1})
    with pytest.raises(ConfigError, match="normalize for reward"):
        build_rewards([{"name": "digit"}, {"name": "colour", "normalize": "zscore"}])


def test_combination_weights_and_normalisation(digits):
    x, prompts = digits
    combined = build_rewards([{"name": "stroke_thickness", "weight": 2.0},
                              {"name": "colour", "weight": -0.5, "normalize": "batch"},
                              {"name": "stroke_thickness", "key": "thin", "thinner": True, "weight": 0.25}])
    assert isinstance(combined, CombinedReward) and combined.differentiable
    out = combined(x, prompts)
    ink = build_reward("stroke_thickness")(x, prompts).total
    colour = build_reward("colour")(x, prompts).total
    z = (colour - colour.mean()) / (colour.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(out.total, 2.0 * ink - 0.5 * z + 0.25 * (-ink))
    assert set(out.scores) == {"stroke_thickness", "colour", "thin"}
    torch.testing.assert_close(out.scores["colour"], colour)  # reported before normalisation
    # after batch normalisation a reward has zero mean and unit spread in the batch
    only = build_rewards([{"name": "digit", "normalize": "batch"}])
    t = only(x, prompts).total
    assert abs(t.mean().item()) < 1e-5 and t.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # a single plain spec is the reward itself
    assert not isinstance(build_rewards(["digit"]), CombinedReward)
    with pytest.raises(ConfigError, match="no reward configured"):
        build_rewards([])


class TwoDims(Reward):
    dimensions = ("a", "b")

    def score(self, samples, prompts, **context):
        m = samples.mean(dim=(1, 2, 3))
        out = {"a": m, "b": 2 * m}
        if context.get("flag_first"):
            out["_valid"] = torch.tensor([False] + [True] * (len(prompts) - 1))
        return out


def test_dimension_weights_and_valid_propagation(digits):
    x, prompts = digits
    REWARDS["two_dims_test"] = TwoDims
    try:
        r = build_reward({"name": "two_dims_test", "weights": {"b": -1.0}})
        out = r(x, prompts)
        m = x.mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.total, m - 2 * m)
        combined = build_rewards([{"name": "two_dims_test"}, {"name": "stroke_thickness", "weight": 0.0}])
        out = combined(x, prompts, flag_first=True)
        assert {"two_dims_test.a", "two_dims_test.b", "two_dims_test"} <= set(out.scores)
        assert out.valid.tolist() == [False] + [True] * 5
    finally:
        REWARDS.pop("two_dims_test", None)


def test_entry_point_group_registers_other_packages(tmp_path, monkeypatch, digits):
    """A package that declares ``[align.rewards] name = module:Class`` is found by name."""
    (tmp_path / "extra_rewards_pkg.py").write_text(
        "import torch\n"
        "from rewards.base import Reward\n"
        "class Brightness(Reward):\n"
        "    differentiable = True\n"
        "    def __init__(self, scale: float = 1.0, weights=None):\n"
        "        super().__init__(weights)\n"
        "        self.scale = scale\n"
        "    def score(self, samples, prompts, **context):\n"
        "        return {'score': self.scale * samples.mean(dim=(1, 2, 3))}\n")
    dist = tmp_path / "extra_rewards_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-rewards-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[align.rewards]\nbrightness_test = extra_rewards_pkg:Brightness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert "brightness_test" in available_rewards()
        reward = build_reward({"name": "brightness_test", "scale": 3.0})
        x, prompts = digits
        torch.testing.assert_close(reward(x, prompts).total, 3.0 * x.mean(dim=(1, 2, 3)))
    finally:
        REWARDS.pop("brightness_test", None)
        sys.modules.pop("extra_rewards_pkg", None)


def test_rewards_list_command(capsys):
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    assert "aesthetic" in out and "differentiable" in out and "ocr" in out and "black-box" in out


@pytest.fixture()
def sample_dir(tmp_path, digits):
    """A folder as `align sample` writes it: PNGs, prompts.txt (file<TAB>prompt) and a grid."""
    from torchvision.transforms.functional import to_pil_image

    x, prompts = digits
    with open(tmp_path / "prompts.txt", "w") as fh:
        for i, (image, prompt) in enumerate(zip(x, prompts)):
            to_pil_image(image).save(tmp_path / f"{i:04d}.png")
            fh.write(f"{i:04d}.png\t{prompt}\n")
    to_pil_image(torch.zeros(3, 8, 8)).save(tmp_path / "grid.png")
    return tmp_path


def _pixels(sample_dir, n):
    from rewards.media import load_sample

    return torch.stack([load_sample(sample_dir / f"{i:04d}.png") for i in range(n)])


def test_score_command_prints_a_table(sample_dir, digits, capsys):
    _, prompts = digits
    rc = main(["score", "--reward", "digit", "--reward", "stroke_thickness", "-o", "stroke_thickness.weight=2",
               "--images", str(sample_dir), "--batch-size", "4"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["file", "prompt", "digit", "stroke_thickness", "total"]
    rows = [line for line in lines if line.startswith("00")]
    assert len(rows) == 6 and "grid.png" not in "\n".join(lines)
    assert lines[-1].startswith("mean") and "(6 of 6 scored)" in lines[-1]
    x = _pixels(sample_dir, 6)
    expected = build_reward("digit")(x, prompts).total + 2 * build_reward("stroke_thickness")(x, prompts).total
    got = torch.tensor([float(r.split()[-1]) for r in rows])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_score_command_json_and_plain_prompt_list(tmp_path, sample_dir, digits, capsys):
    _, prompts = digits
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(prompts) + "\n")
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        (images / f"{i:04d}.png").write_bytes((sample_dir / f"{i:04d}.png").read_bytes())
    config = tmp_path / "rewards.yaml"
    config.write_text("rewards:\n  - name: colour\n    temperature: 0.05\n")
    assert main(["score", "--config", str(config), "--images", str(images), "--prompts", str(plain), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["prompt"] for d in data] == prompts and all(d["valid"] for d in data)
    expected = build_reward({"name": "colour", "temperature": 0.05})(_pixels(sample_dir, 6), prompts).total
    torch.testing.assert_close(torch.tensor([d["scores"]["total"] for d in data]), expected, atol=1e-5, rtol=0)


def test_score_command_errors_are_one_line(sample_dir, tmp_path, capsys):
    assert main(["score", "--reward", "digitt", "--images", str(sample_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown reward 'digitt'" in err and "did you mean 'digit'" in err and "\n" not in err
    assert main(["score", "--reward", "digit", "-o", "colour=1", "--images", str(sample_dir)]) == 2
    assert "unknown option of reward 'digit' 'colour'" in capsys.readouterr().err
    assert main(["score", "--reward", "digit", "--images", str(tmp_path / "nope")]) == 2
    assert "no images folder" in capsys.readouterr().err
    assert main(["score", "--reward", "digit", "--reward", "colour", "-o", "weight=2",
                 "--images", str(sample_dir)]) == 2
    assert "prefix the key" in capsys.readouterr().err
    wrong = tmp_path / "two.txt"
    wrong.write_text("a\nb\n")
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes((sample_dir / "0000.png").read_bytes())
    assert main(["score", "--reward", "digit", "--images", str(images), "--prompts", str(wrong)]) == 2
    assert "has 2 prompts but" in capsys.readouterr().err


def test_score_command_invalid_samples(tmp_path, sample_dir, capsys):
    """Samples a reward cannot score are shown as invalid and left out of the mean."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes((sample_dir / f"{i:04d}.png").read_bytes())
    (images / "prompts.txt").write_text('0.png\ta sign "OPEN"\n1.png\tno quoted text\n')

    class Engine:
        def __call__(self, image):
            return [([[0, 0], [1, 0], [1, 1], [0, 1]], "OPEN", 0.99)], [0.0]

    REWARDS["ocr_scripted_test"] = type("ScriptedOcr", (REWARDS["ocr"],), {
        "__init__": lambda self, weights=None: REWARDS["ocr"].__init__(self, engine=Engine(), weights=weights)})
    try:
        assert main(["score", "--reward", "ocr_scripted_test", "--images", str(images)]) == 0
    finally:
        REWARDS.pop("ocr_scripted_test", None)
    out = capsys.readouterr().out
    assert "invalid" in out and "(1 of 2 scored)" in out


def test_score_command_reads_videos(tmp_path, capsys):
    """mp4 / gif files are scored as videos (B, F, C, H, W); frame-level rewards average over frames."""
    import imageio.v3 as iio
    import numpy as np

    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = 255  # a white square: mean ink 0.25
    iio.imwrite(tmp_path / "a.gif", frames)
    (tmp_path / "prompts.txt").write_text("a.gif\ta square\n")
    assert main(["score", "--reward", "stroke_thickness", "--reward", "video_frames",
                 "-o", "video_frames.dims=[motion_smoothness]", "--images", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["scores"]["stroke_thickness"] == pytest.approx(0.25, abs=1e-3)
    assert data[0]["scores"]["video_frames"] == pytest.approx(1.0, abs=1e-3)  # a still video
