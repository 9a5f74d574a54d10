"""Training evidence on the embedded default (slow): Euphonium's guided GRPO improves the UNGUIDED
model (its evaluation samples without the drift), and Adv-GRPO moves the samples toward thick blue
reference digits by measures other than its head (how blue, how thick)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import load_config
from align.trainers import trainer_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "methods"
QUIET = ["run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0"]

#: configs/methods/euphonium.yaml, 30 iterations, seeds 0-2: unguided evaluation reward 0.8786 before,
#: 0.9401 / 0.9412 / 0.9466 after (plain flow_grpo on the same setting: 0.9425 / 0.9485 / 0.9504: near
#: the digit reward's ceiling the guidance does not help; on stroke thickness it does, docs/guided_sampling.md)
EUPHONIUM_GAINS = (0.0615, 0.0626, 0.0680)
#: configs/methods/adv_grpo.yaml, 30 iterations, seeds 0-2, before -> after: the samples' blueness (the
#: colour reward of "blue") 0.150 -> 0.916 / 1.000 / 0.645 and their mean ink 0.290 -> 0.475 / 0.563 /
#: 0.849 (diversity falls 0.28 -> 0.17 / 0.13 / 0.10: one style, as the references are)
ADV_BLUE_GAINS = (0.7662, 0.8500, 0.4951)
ADV_INK_GAINS = (0.1846, 0.2725, 0.5585)


def required_gain(gains) -> float:
    """More than the seed-to-seed noise and more than half the typical gain."""
    return max(statistics.stdev(gains), 0.5 * statistics.mean(gains))


def test_euphonium_distillation_improves_the_unguided_model(tmp_path):
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, PRESETS / "euphonium.yaml",
                         QUIET + ["iterations=30", "run.seed=0", f"run.output_dir={tmp_path}"])
    assert config.guidance.enabled  # the rollouts are guided; the evaluation samples without the drift
    summary = module.train(config)
    gain = summary["reward_after"] - summary["reward_before"]
    assert gain > required_gain(EUPHONIUM_GAINS), (gain, EUPHONIUM_GAINS)


def test_adv_grpo_moves_samples_toward_the_references(tmp_path):
    """Blueness must rise by more than its seed noise; ink (whose seed spread is as large as its
    mean) by more than half the smallest measured gain."""
    refs = tmp_path / "refs"
    done = subprocess.run([sys.executable, "scripts/make_reference_digits.py", str(refs / "thick_blue"),
                           "--tiny-dino", str(refs / "tiny_dino.pth")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, PRESETS / "adv_grpo.yaml",
                         QUIET + ["run.seed=0", f"run.output_dir={tmp_path / 'run'}"])
    config.rewards[0]["reference_dir"] = str(refs / "thick_blue")
    config.rewards[0]["checkpoint"] = str(refs / "tiny_dino.pth")
    after = module.train(config)
    before = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert before["iteration"] == 0
    blue = after["eval/heldout/blue"] - before["eval/heldout/blue"]
    ink = after["eval/heldout/stroke_thickness"] - before["eval/heldout/stroke_thickness"]
    assert blue > required_gain(ADV_BLUE_GAINS), (blue, ADV_BLUE_GAINS)
    assert ink > 0.5 * min(ADV_INK_GAINS), (ink, ADV_INK_GAINS)
