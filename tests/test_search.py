"""Test-time search (align/commands/search.py, ``align search``): keeping everything is best-of-N exactly, the
cost account of a pruned search is the sum of live rows, and the schedule helpers' closed forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from align.config import load_config
from align.commands.search import SearchConfig, equal_cost_candidates, keep_count, search, top_per_group, ttsnap_steps

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = "prompts=[a red digit 7,a blue digit 3]"


@pytest.fixture(scope="module")
def toy_adapter():
    from pipelines.toy import load_toy_adapter

    return load_toy_adapter()


def test_schedule_helpers():
    assert ttsnap_steps(20) == [2, 6, 11]  # TTSnap's own schedule
    assert ttsnap_steps(10) == [1, 3, 6]  # the same fractions of 10 steps (5.5 rounds to 6)
    assert ttsnap_steps(4) == [0, 1, 2]  # distinct, before the last step
    assert [keep_count(16, 0.4), keep_count(7, 0.4), keep_count(3, 0.5), keep_count(3, 0.1, floor=2)] == [7, 3, 2, 2]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_per_group(scores, groups, {0: 2, 1: 2}).tolist() == [1, 2, 3, 4]  # tie: the earlier row
    assert equal_cost_candidates(61 + 28, num_steps=10) == 8


def test_keeping_everything_is_best_of_n_exactly(toy_adapter):
    base = [PROMPTS, "num_candidates=6", "top_k=2", "rewards=[stroke_thickness]", "seed=3"]
    best_of_n = search(toy_adapter, load_config(SearchConfig, overrides=base + ["method=best_of_n"]))
    kept = search(toy_adapter, load_config(SearchConfig, overrides=base + ["keep_fractions=[1.0,1.0,1.0]"]))
    assert torch.equal(kept.best, best_of_n.best) and torch.equal(kept.best_scores, best_of_n.best_scores)
    assert torch.equal(kept.final_scores, best_of_n.final_scores)
    assert kept.model_evaluations == best_of_n.model_evaluations == 2 * 6 * 10
    assert best_of_n.reward_calls == 12 and kept.reward_calls == 12 + 3 * 12  # it scored x0_hat 3 times
    assert bool((best_of_n.best_scores[:, 0] >= best_of_n.best_scores[:, 1]).all())
    # the best of each prompt is the maximum over its candidates
    for p in range(2):
        assert float(best_of_n.best_scores[p, 0]) == float(best_of_n.final_scores[best_of_n.final_prompt_index == p].max())


def test_pruned_cost_account_counts_live_rows(toy_adapter):
    """16 candidates, 10 steps, TTSnap's 0.4 / 0.4 / 0.5 at steps 1, 3, 6: rows 16 (steps 0-1), 7
    (2-3), 3 (4-6), 2 (7-9) -> 61 model evaluations and 16 + 7 + 3 + 2 = 28 reward calls per prompt."""
    result = search(toy_adapter, load_config(SearchConfig, overrides=[PROMPTS, "num_candidates=16",
                                                                      "rewards=[stroke_thickness]"]))
    assert result.model_evaluations == 2 * 61 and result.reward_calls == 2 * 28
    assert result.cost == 2 * (61 + 28) and len(result.final_scores) == 4
    assert "model_evaluations=122 reward_calls=56 total=178" in result.account()


def test_align_search_cli_writes_the_best_and_refuses_bad_names(tmp_path):
    out = tmp_path / "found"
    cmd = [sys.executable, "-m", "align", "search", "--prompt", "a red digit 7", "--reward", "stroke_thickness",
           "--num", "8", "--top-k", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cost: model_evaluations=" in done.stdout and "a red digit 7: best " in done.stdout
    rows = (out / "scores.tsv").read_text().splitlines()
    assert rows[0] == "file\tprompt\tscore" and len(rows) == 3
    assert float(rows[1].split("\t")[2]) >= float(rows[2].split("\t")[2])
    assert (out / "p000-00.png").is_file() and (out / "grid.png").is_file()
    bad = subprocess.run(cmd[:-2] + ["--reward", "stroke_thicknes", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "stroke_thicknes" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_noise_aware_prune_reward_gets_each_steps_sigma(toy_adapter):
    """A pruning reward with ``takes_sigma`` (the noise_aware reward) is called with the noise level
    of the x0_hat it scores: the schedule's sigma at each pruning step."""
    from rewards.base import Reward

    seen = []

    class Recorder(Reward):
        takes_sigma = True

        def score(self, samples, prompts, sigma=None, **context):
            seen.append(sigma.unique().tolist())
            return {"score": samples.mean(dim=(1, 2, 3))}

    config = load_config(SearchConfig, overrides=[PROMPTS, "num_candidates=4", "rewards=[stroke_thickness]",
                                                  "rollout.num_steps=10"])
    search(toy_adapter, config, prune_reward=Recorder())
    levels = toy_adapter.schedule(10).levels
    assert seen == [[pytest.approx(float(levels[s]))] for s in (1, 3, 6)]
