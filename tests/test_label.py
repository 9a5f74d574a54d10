"""Human labels for D3PO: ``align label`` writes the pairs, a judging page and the trajectories;
training on the filled file re-scores the stored steps exactly (the first loss is ln 2) and uses
only the judged pairs; a label file of other settings or a bad line is one line."""

from __future__ import annotations

import json
import math

import pytest

from align.commands.cli import main
from align.config import ConfigError
from align.labels import read_labels
from pipelines.toy import TOY_WEIGHTS_DIR

pytestmark = pytest.mark.skipif(not (TOY_WEIGHTS_DIR / "config.json").exists(), reason="toy model weights not built")
SETTINGS = ["model.name=toy", "rollout.num_steps=3", "rollout.kernel=flow_grpo", "rollout.guidance_scale=1.0"]


@pytest.fixture(scope="module")
def label_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "pairs"
    assert main(["label", "--out", str(out), "--pairs", "3", *SETTINGS]) == 0
    return out


def fill(folder, choices):
    lines = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    for line, choice in zip(lines, choices):
        line["preferred"] = choice
    path = folder / "filled.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_label_writes_the_pairs_the_page_and_the_trajectories(label_folder):
    lines = [json.loads(line) for line in (label_folder / "pairs.jsonl").read_text().splitlines()]
    assert [line["preferred"] for line in lines] == [None] * 3
    page = (label_folder / "index.html").read_text()
    for line in lines:
        assert (label_folder / line["a"]).is_file() and (label_folder / line["b"]).is_file()
        assert line["prompt"] in page and f'src="{line["a"]}"' in page and f'name="pair{line["pair"]}"' in page
    info = json.loads((label_folder / "trajectories.json").read_text())
    assert info["num_steps"] == 3 and [s["step"] for s in info["steps"]] == [0, 1, 2]
    with pytest.raises(ConfigError, match="no pair is judged yet"):
        read_labels(label_folder / "pairs.jsonl")


def test_training_on_the_judged_pairs_rescores_the_stored_steps_exactly(label_folder, tmp_path):
    filled = fill(label_folder, ["b", "tie", "a"])
    labels = read_labels(filled)
    assert labels.winner.tolist() == [1, 4] and labels.loser.tolist() == [0, 5]
    code = main(["train", "d3po", *SETTINGS, f"labels={filled}", "iterations=1", "train_last_step=true",
                 "eval.per_prompt=1", "eval_prompts=['a red digit 3']", f"run.output_dir={tmp_path}",
                 "run.log_with=none", "run.progress=false", "run.checkpoint_every=0"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    # before the update every stored step re-scores exactly under the sampling weights: ratio 1, ln 2
    assert first["train/pairs"] == 2.0 and first["train/grad_norm"] > 0
    assert abs(first["train/loss"] - math.log(2)) < 1e-4


def test_a_label_file_of_other_settings_or_a_bad_line_is_one_line(label_folder, tmp_path, capsys):
    filled = fill(label_folder, ["a", "a", "a"])
    assert main(["train", "d3po", "model.name=toy", "rollout.num_steps=5", f"labels={filled}",
                 f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "were sampled with rollout.num_steps=3, this config has 5" in err
    bad = fill(label_folder, ["a", "maybe", "a"])
    with pytest.raises(ConfigError, match="line 2: preferred must be one of a, b, tie or null, got 'maybe'"):
        read_labels(bad)


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (scripts/test.sh installs Debian's as root)")
def test_choices_on_the_judging_page_download_a_file_dpo_trains_on(label_folder, tmp_path):
    """The page's script in headless Chromium: choose b, tie, a; the downloaded pairs.jsonl holds exactly
    those choices; `align train dpo pairs=` trains on its two judged pairs, the first loss at ln 2 (the
    policy is the reference before its first update)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto((label_folder / "index.html").as_uri())
        for pair, choice in enumerate(["b", "tie", "a"]):
            page.locator(f'input[name="pair{pair}"][value="{choice}"]').check()
        assert page.locator("#count").text_content() == "3 of 3 judged"
        with page.expect_download() as download:
            page.locator("#download").click()
        assert download.value.suggested_filename == "pairs.jsonl"
        judged = label_folder / "judged.jsonl"  # beside the images, as the page asks
        download.value.save_as(judged)
        browser.close()
    original = [json.loads(line) for line in (label_folder / "pairs.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in judged.read_text().splitlines()]
    assert [r["preferred"] for r in rows] == ["b", "tie", "a"]
    assert [{k: v for k, v in r.items() if k != "preferred"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "preferred"} for r in original]

    from align.trainers.dpo import read_pairs

    pairs = read_pairs(str(judged))  # the tie is dropped; b won pair 0, a won pair 2
    assert [(q.chosen.name, q.rejected.name) for q in pairs] == [(rows[0]["b"], rows[0]["a"]), (rows[2]["a"], rows[2]["b"])]
    code = main(["train", "dpo", "model.name=toy", f"pairs={judged}", "iterations=1", "pairs_per_iteration=2",
                 "eval.per_prompt=1", "eval_prompts=['a red digit 3']", f"run.output_dir={tmp_path}",
                 "run.log_with=none", "run.progress=false", "run.checkpoint_every=0"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    assert abs(first["train/loss"] - math.log(2)) < 1e-5 and first["train/grad_norm"] > 0
