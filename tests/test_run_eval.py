"""``align eval RUN_DIR``: the before / after table of a run folder reproduces the run's own first
and last evaluation (same prompts, seeds and weights), from the LoRA export or, without one, from
the newest checkpoint; every recipe says which table it produces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "flow_grpo", "--config", str(ROOT / "configs" / "quickstart.yaml"), "iterations=2",
                 "group_size=4", "prompts_per_iteration=2", "eval.per_prompt=2", f"run.output_dir={folder}",
                 "run.log_with=none", "run.progress=false", "run.checkpoint_every=1"]) == 0
    return folder


def own_evaluations(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward" in r]
    return evals[0], evals[-1]


def test_eval_reproduces_the_runs_first_and_last_evaluation(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    first, last = own_evaluations(run_dir)
    assert set(report["metrics"]) == {"eval/reward", "eval/heldout/digit_judge", "eval/heldout/jpeg_compressibility",
                                      "eval/diversity"}
    for key, value in report["metrics"].items():
        assert value["before"] == pytest.approx(first[key], abs=1e-5), key
        assert value["after"] == pytest.approx(last[key], abs=1e-5), key
    assert report["weights"].endswith("lora")
    markdown = (run_dir / "eval.md").read_text()
    reward = report["metrics"]["eval/reward"]
    assert f"| trained reward | {reward['before']:.4f} | {reward['after']:.4f} |" in markdown
    from PIL import Image

    with Image.open(run_dir / "eval" / "side_by_side.png") as image:
        assert image.height == 4 * 96  # four evaluation prompts of 16 px samples, enlarged to 96 px rows
    assert "trained reward:" in capsys.readouterr().out


def test_eval_without_a_lora_export_reads_the_newest_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "lora")
    assert main(["eval", str(copy)]) == 0
    report = json.loads((copy / "eval.json").read_text())
    _, last = own_evaluations(run_dir)
    assert "checkpoints/iteration-000002" in report["weights"]
    assert report["metrics"]["eval/reward"]["after"] == pytest.approx(last["eval/reward"], abs=1e-5)


def test_eval_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and err.count("\n") == 1


def test_every_recipe_says_which_table_it_produces():
    recipes = [p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in recipes if "# eval table:" not in p.read_text()]
    assert not missing, f"recipes without an '# eval table:' comment: {missing}"
