"""Sweeps: the grid of trials, a tiny sweep that is killed mid-way and run again without redoing its
finished trials, its report (rows, valid plots), and an Optuna search that resumes a trial left
running by a process that died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.errors import ConfigError
from align.commands.sweep import SweepConfig, grid_trials, load_sweep, run_sweep
from align.commands.sweep_report import write_report

ROOT = Path(__file__).resolve().parents[1]
#: a trial of two iterations: 2 prompts x 4 samples x 10 steps = 80 model evaluations each
TINY = """
out: {out}
max_nfe: 160
eval_every_nfe: 80
methods: [flow_grpo, raft]
seeds: [0, 1]
threads: 1
overrides:
  group_size: 4
  prompts_per_iteration: 2
  eval_prompts: ["a white digit 3", "a cyan digit 5"]
  eval: {{per_prompt: 2}}
"""


def write_sweep(tmp_path, text=TINY, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(text.format(out=tmp_path / "out", **fields))
    return path


def test_the_grid_is_every_method_reward_setting_and_seed():
    config = SweepConfig(methods=["flow_grpo", "raft"], rewards={"digit": ["digit"], "bold": ["stroke_thickness"]},
                         settings={"optim.lr": [0.001, 0.002]}, seeds=[0, 1, 2])
    trials = grid_trials(config)
    assert len(trials) == 2 * 2 * 2 * 3 and len({t.name for t in trials}) == len(trials)
    assert trials[0].name == "flow_grpo-digit-lr=0.001-seed0"
    assert {t.settings["optim.lr"] for t in trials} == {0.001, 0.002}


def test_method_overrides_reach_that_methods_trials_only(tmp_path):
    """A field only one trainer has (Flow-GRPO's window) goes to that method's trials, on top of the
    sweep's overrides; the other method's trials validate without it."""
    from align.commands.sweep import trial_config

    config = SweepConfig(methods=["flow_grpo", "raft"], overrides={"optim": {"lr": 0.001}, "iterations": 1},
                         method_overrides={"flow_grpo": {"window_size": 3, "optim.lr": 0.003}})
    by_method = {t.method: trial_config(config, t, tmp_path / t.name)[1] for t in grid_trials(config)}
    assert by_method["flow_grpo"].window_size == 3 and by_method["flow_grpo"].optim.lr == 0.003
    assert by_method["raft"].optim.lr == 0.001 and not hasattr(by_method["raft"], "window_size")


@pytest.mark.parametrize("line, message", [
    ("methods: [flow_grpo, flow_gpro]", "flow_grpo"),
    ("settings: {optim.lr: 0.001}", "settings.optim.lr"),
    ("method_overrides: {flow_gpro: {window_size: 3}}", "flow_grpo"),
    ("search: {params: {optim.lr: {low: 0.1, high: 0.01}}}", "low < high"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_problem(tmp_path, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"out: {tmp_path}/out\n{line}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert "\n" not in str(err.value)


def test_a_killed_sweep_resumes_without_redoing_finished_trials(tmp_path, capsys):
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    first = out / "trials" / "flow_grpo-seed0" / "trial.json"
    worker = subprocess.Popen([sys.executable, "-m", "align", "sweep", str(path), "--no-report"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not first.is_file() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
    worker.kill()
    worker.wait()
    assert first.is_file(), "the first trial did not finish in time"
    finished_at = first.stat().st_mtime_ns
    done_before = sorted(p.parent.name for p in out.glob("trials/*/trial.json"))
    assert len(done_before) < 4, "the sweep ended before it was killed: nothing was left to resume"

    run_sweep(path)
    printed = capsys.readouterr().out
    assert first.stat().st_mtime_ns == finished_at
    for name in done_before:
        assert f"sweep: {name} finished before, skipped" in printed
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]
    assert [i["name"] for i in infos] == ["flow_grpo-seed0", "flow_grpo-seed1", "raft-seed0", "raft-seed1"]
    assert all(i["status"] == "complete" for i in infos)

    paths = write_report(out)
    rows = (out / "report.csv").read_text().splitlines()
    assert rows[0].startswith("trial,method,") and len(rows) == 1 + 4
    markdown = (out / "report.md").read_text()
    assert "| flow_grpo | 2 |" in markdown and "| raft | 2 |" in markdown and "digit_judge before -> after" in markdown
    from PIL import Image

    for name in ("reward_vs_nfe.png", "reward_vs_time.png", "final_reward.png", "heldout.png"):
        assert out / name in paths
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.width > 400 and image.height > 300
    # the curve points: evaluated at the start, each 80 model evaluations (eval_every_nfe), and at the end
    metrics = [json.loads(line) for line in (out / "trials" / "flow_grpo-seed1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nfe"] for m in metrics if "eval/reward" in m] == [0, 80, 160, 160]
    assert "| flow_grpo-seed1 | complete | 160 |" in markdown


def test_an_optuna_search_resumes_a_trial_whose_process_died(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    text = TINY.replace("methods: [flow_grpo, raft]", "methods: [raft]").replace("seeds: [0, 1]", "seeds: [0]")
    text += "search: {{trials: 2, params: {{optim.lr: {{low: 0.0005, high: 0.005, log: true}}}}}}\n"
    path = write_sweep(tmp_path, text)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    study = optuna.create_study(study_name="raft", storage=storage, direction="maximize")
    left = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.0005, 0.005, log=True)})
    left.set_user_attr("host", __import__("socket").gethostname())
    left.set_user_attr("pid", dead.pid)

    run_sweep(path)
    trials = optuna.load_study(study_name="raft", storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params == left.params
    info = json.loads((out / "trials" / "raft-trial0-seed0" / "trial.json").read_text())
    assert info["settings"] == left.params and trials[0].value == pytest.approx(info["summary"]["eval/reward"])


def test_convergence_table_finds_the_evaluations_each_method_needs_to_reach_flow_grpos_final_reward():
    """Flow-GRPO's two seeds end at 0.7 (mean), first reached at its last point (200 NFE: one seed at
    167, two thirds of 0.6 -> 0.75, the other never); a method at
    0.5 -> 0.8 -> 0.9 crosses 0.7 two thirds of the way to 100 NFE (ratio 1/3), one that ends at 0.6
    never does."""
    from align.commands.sweep_report import convergence_lines, metric_key, metric_name, nfe_to_reach

    def run(*rewards):
        return [{"nfe": 100.0 * i, "eval/reward": r} for i, r in enumerate(rewards)]

    assert nfe_to_reach([0, 100, 200], [0.5, 0.8, 0.9], 0.7) == pytest.approx(200 / 3)
    assert nfe_to_reach([0, 100], [0.5, 0.6], 0.7) is None
    groups = {"flow_grpo": [run(0.5, 0.6, 0.65), run(0.5, 0.6, 0.75)], "fast": [run(0.5, 0.8, 0.9)],
              "slow": [run(0.5, 0.55, 0.6)]}
    lines = convergence_lines(groups)
    assert "first reached at 200 model evaluations" in "\n".join(lines)
    assert "| fast | 1 | 67 | 0.33x | 67 |" in lines and "| flow_grpo | 2 | 200 | 1.00x | not reached, 167 |" in lines
    assert "| slow | 1 | not reached |  | not reached |" in lines
    assert convergence_lines({"fast": groups["fast"]}) == []  # no Flow-GRPO: no table
    falling = convergence_lines({"flow_grpo": [run(0.5, 0.45, 0.4)], "fast": groups["fast"]})
    assert any("ends no higher than it starts (0.5000)" in line for line in falling)
    for key in ("eval/reward", "eval/reward/motion.direction", "eval/heldout/frame_judge", "eval/diversity"):
        assert metric_key(metric_name(key)) == key


def test_a_sweep_of_edit_runs_reports_the_edit_dimensions(tmp_path):
    """Methods on the embedded editing default (edit prompt files carrying their sources): every trial
    completes and the report holds the trained edit score's dimensions and the held-out judge's."""
    prompts = ROOT / "configs" / "prompts" / "toy_edit"
    path = write_sweep(tmp_path, """
out: {out}
max_nfe: 160
eval_every_nfe: 160
methods: [flow_grpo, reward_backprop]
seeds: [0]
threads: 1
overrides:
  model: {{name: toy_edit}}
  rewards: [{{name: edit_score, instruction: edit_instruction, preservation: {{name: preservation, greyscale: true}}}}]
  prompt_file: {train}
  eval_prompt_file: {eval}
  prompts_per_iteration: 2
  group_size: 4
  eval: {{per_prompt: 1}}
""", train=prompts / "train.jsonl", eval=prompts / "eval.jsonl")
    run_sweep(path)
    out = tmp_path / "out"
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]
    assert [(i["name"], i["status"]) for i in infos] == [("flow_grpo-seed0", "complete"),
                                                         ("reward_backprop-seed0", "complete")]
    write_report(out)
    markdown = (out / "report.md").read_text()
    for column in ("reward.instruction before -> after", "reward.preservation before -> after",
                   "edit_judge.instruction before -> after", "edit_judge.preservation before -> after"):
        assert column in markdown, column


def test_processes_sharing_a_search_draw_different_points(tmp_path):
    """Two processes join one study at once (the first has asked its point, not told it): each seeds
    its sampler apart (trial count + worker index), so the second does not train the first's point
    again; a lone sweep from scratch is seeded 0 and reproducible."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from align.commands.sweep import study_sampler

    lr = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    for kind in ("tpe", "random"):
        first = optuna.create_study(study_name=kind, storage=storage, direction="maximize", load_if_exists=True)
        first.sampler = study_sampler(kind, len(first.get_trials()), 0)
        a = first.ask(lr)
        second = optuna.create_study(study_name=kind, storage=storage, direction="maximize", load_if_exists=True)
        second.sampler = study_sampler(kind, len(second.get_trials()), 1)
        b = second.ask(lr)
        assert a.params != b.params
        # the same two processes with one seed each (the old way) would have drawn one point twice
        again = optuna.create_study(study_name=f"{kind}-alone", storage=storage, direction="maximize")
        again.sampler = study_sampler(kind, 0, 0)
        assert again.ask(lr).params == a.params
