"""The report of a sweep folder: a table (``report.csv`` per trial, ``report.md`` per method with the
seed spread, then per trial) and plots (matplotlib PNGs):

- ``reward_vs_nfe.png`` and ``reward_vs_time.png``: the evaluation reward against model evaluations and
  training wall time, per method, mean over seeds with the min-max band;
- ``final_reward.png``: the final trained and held-out rewards per method (bars: mean over seeds,
  whiskers: their std, ticks: before training);
- ``heldout.png``: the trained reward and each held-out reward against model evaluations side by side
  (reward hacking shows as the trained one rising while a held-out one falls).

When the sweep has Flow-GRPO trials, ``report.md`` also says how many model evaluations every method
needs to reach Flow-GRPO's final reward (mean over seeds), and its ratio to Flow-GRPO's own.

The numbers come from each trial's ``trial.json`` and ``metrics.jsonl`` (its evaluations, with the
``nfe`` and ``wall_s`` they were reached at), so a report can be written at any time, also while
the sweep runs.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

TRAINED = "eval/reward"
#: the method whose final reward the convergence table measures every method against
REFERENCE_METHOD = "flow_grpo"


def evaluations(run_folder: Path) -> list[dict]:
    """The evaluation rows of a run's metrics (the start point first), each with ``nfe`` and ``wall_s``."""
    path = run_folder / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if TRAINED in row:
            row = {**row, "nfe": row.get("nfe", 0.0), "wall_s": row.get("wall_s", 0.0)}
            if rows and rows[-1]["nfe"] == row["nfe"] and rows[-1]["iteration"] == row["iteration"]:
                rows[-1] = row  # the final evaluation of a run whose last periodic one fell on the same step
            else:
                rows.append(row)
    return rows


def trial_rows(out: Path) -> list[dict]:
    """One row per trial folder with a ``trial.json``: what it was, its status, and its first and
    last evaluation (trained reward, each held-out reward, diversity)."""
    rows = []
    for info_path in sorted((out / "trials").glob("*/trial.json")):
        info = json.loads(info_path.read_text())
        evals = evaluations(info_path.parent)
        row = {"trial": info["name"], "method": info["method"], "reward": info.get("reward") or "",
               "settings": " ".join(f"{k}={v}" for k, v in (info.get("settings") or {}).items()),
               "seed": info["seed"], "status": info["status"], "error": info.get("error", "")}
        if evals:
            first, last = evals[0], evals[-1]
            row.update(nfe=int(last["nfe"]), wall_s=round(last["wall_s"], 1))
            for key in sorted(k for k in last if k.startswith("eval/")):
                name = metric_name(key)
                row[f"{name}_before"] = first.get(key)
                row[f"{name}_after"] = last[key]
        rows.append(row)
    return rows


def metric_name(key: str) -> str:
    """A report column's name for an evaluation metric: ``reward``, ``reward.<dimension>`` (a dimension of
    the trained reward), the held-out reward's name, ``diversity``."""
    if key == TRAINED:
        return "reward"
    if key.startswith(TRAINED + "/"):
        return "reward." + key[len(TRAINED) + 1:]
    return key.split("/")[-1]


def metric_key(name: str) -> str:
    """The inverse of :func:`metric_name`."""
    if name == "reward" or name.startswith("reward."):
        return TRAINED + name[len("reward"):].replace(".", "/", 1)
    return "eval/diversity" if name == "diversity" else f"eval/heldout/{name}"


def heldout_names(names: list[str]) -> list[str]:
    """The held-out rewards among a report's metric names."""
    return [n for n in names if n != "diversity" and n != "reward" and not n.startswith("reward.")]


def metric_names(rows: list[dict]) -> list[str]:
    """reward, its dimensions, then the held-out rewards, then diversity: the columns a report compares."""
    names = [k[:-len("_after")] for r in rows for k in r if k.endswith("_after")]
    ordered = list(dict.fromkeys(names))
    return sorted(ordered, key=lambda n: (n != "reward", not n.startswith("reward."), n == "diversity", n))


def group_key(row: dict) -> str:
    return " ".join(p for p in (row["method"], row["reward"], row["settings"]) if p)


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per method (and reward and settings): seeds, the mean and std over seeds of the trained
    reward's gain and of every metric's final value, mean NFE and wall seconds; best gain first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "complete" and "reward_after" in row:
            groups.setdefault(group_key(row), []).append(row)
    out = []
    for key, members in groups.items():
        entry = {"method": key, "seeds": len(members)}
        gains = [m["reward_after"] - m["reward_before"] for m in members]
        entry["gain"], entry["gain_std"] = statistics.mean(gains), spread(gains)
        for name in metric_names(members):
            befores = [m[f"{name}_before"] for m in members if m.get(f"{name}_before") is not None]
            afters = [m[f"{name}_after"] for m in members if f"{name}_after" in m]
            entry[f"{name}_before"] = statistics.mean(befores) if befores else float("nan")
            entry[name], entry[f"{name}_std"] = statistics.mean(afters), spread(afters)
        entry["nfe"] = statistics.mean(m["nfe"] for m in members)
        entry["wall_s"] = statistics.mean(m["wall_s"] for m in members)
        out.append(entry)
    return sorted(out, key=lambda e: -e["gain"])


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(summary: list[dict], rows: list[dict]) -> str:
    names = metric_names(rows)
    head = ["method", "seeds", "reward gain"] + [f"{n} before -> after" for n in names] + ["NFE", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["method"], str(e["seeds"]), f"{e['gain']:+.3f} ± {e['gain_std']:.3f}"]
        for n in names:
            cells.append(f"{e.get(n + '_before', float('nan')):.3f} -> {e.get(n, float('nan')):.3f} ± "
                         f"{e.get(n + '_std', 0.0):.3f}" if n in e else "")
        cells += [f"{e['nfe']:.0f}", f"{e['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path) -> list[Path]:
    """report.csv, report.md and the four plots of the sweep folder ``out``; returns their paths."""
    from align.errors import ConfigError

    out = Path(out)
    rows = trial_rows(out)
    if not rows:
        raise ConfigError(f"align sweep report: {out} holds no finished trial (no trials/*/trial.json)")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    summary = summary_rows(rows)
    failed = [r for r in rows if r["status"] != "complete"]
    text = [f"# Sweep {out.name}", "", f"{len(rows) - len(failed)} trials complete, {len(failed)} failed.", "",
            "Per method: mean ± std over seeds of the trained reward's gain and of each metric's final value "
            "(held-out rewards are not trained; diversity is the mean pairwise RMS distance of a prompt's "
            "samples).", "", markdown_table(summary, rows), "", "## Trials", ""]
    names = metric_names(rows)
    head = ["trial", "status", "NFE", "wall s"] + [f"{n} before -> after" for n in names]
    text += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], r["status"] if not r["error"] else f"{r['status']}: {r['error']}",
                 str(r.get("nfe", "")), str(r.get("wall_s", ""))]
        cells += [f"{r[n + '_before']:.3f} -> {r[n + '_after']:.3f}" if r.get(n + "_before") is not None
                  and n + "_after" in r else "" for n in names]
        text.append("| " + " | ".join(cells) + " |")
    text += convergence_lines(curves(out, rows))
    (out / "report.md").write_text("\n".join(text) + "\n")
    return [out / "report.csv", out / "report.md", *write_plots(out, rows)]


def nfe_to_reach(nfe: list[float], reward: list[float], target: float) -> float | None:
    """The model evaluations at which a reward curve first reaches ``target`` (linear between its
    evaluation points); None when it never does."""
    for i, value in enumerate(reward):
        if value >= target:
            if i == 0:
                return float(nfe[0])
            low, high = reward[i - 1], value
            return float(nfe[i - 1] + (nfe[i] - nfe[i - 1]) * (target - low) / (high - low))
    return None


def mean_curve(runs: list[list[dict]]) -> tuple[list[float], list[float]]:
    """(NFE, mean trained reward over seeds) at the evaluation points every seed has."""
    shared = sorted(set.intersection(*({p["nfe"] for p in r} for r in runs)))
    return shared, [statistics.mean(next(p[TRAINED] for p in r if p["nfe"] == x) for r in runs) for x in shared]


def convergence_lines(groups: dict[str, list[list[dict]]]) -> list[str]:
    """report.md's convergence table: per method, the model evaluations its mean reward curve needs to
    reach the final mean reward of :data:`REFERENCE_METHOD`, the ratio to the reference's own, and the
    same per seed (the seed's curve against the reference's final mean); [] without the reference."""
    reference = groups.get(REFERENCE_METHOD)
    if not reference:
        return []
    ref_nfe, ref_reward = mean_curve(reference)
    target, ref_need = ref_reward[-1], nfe_to_reach(ref_nfe, ref_reward, ref_reward[-1])
    lines = ["", f"## Model evaluations to reach {REFERENCE_METHOD}'s final reward", "",
             f"{REFERENCE_METHOD}'s final trained reward (mean over its {len(reference)} seeds): {target:.4f}, "
             f"first reached at {ref_need:.0f} model evaluations. Per method: where its mean curve reaches it, "
             "the ratio to that, and each seed's curve.", ""]
    if not ref_need:
        lines += [f"{REFERENCE_METHOD} ends no higher than it starts ({ref_reward[0]:.4f}): every method reaches its "
                  "final reward before training, so the ratios below measure nothing.", ""]
    lines += ["| method | seeds | NFE to reach | ratio | per seed |", "|---|---|---|---|---|"]
    for group, runs in sorted(groups.items()):
        need = nfe_to_reach(*mean_curve(runs), target)
        seeds = [nfe_to_reach([p["nfe"] for p in r], [p[TRAINED] for p in r], target) for r in runs]
        per_seed = ", ".join("not reached" if n is None else f"{n:.0f}" for n in seeds)
        lines.append(f"| {group} | {len(runs)} | {'not reached' if need is None else f'{need:.0f}'} | "
                     f"{'' if need is None or not ref_need else f'{need / ref_need:.2f}x'} | {per_seed} |")
    return lines


def curves(out: Path, rows: list[dict]) -> dict[str, list[list[dict]]]:
    """group -> the evaluation rows of each of its complete trials."""
    groups: dict[str, list[list[dict]]] = {}
    for row in rows:
        if row["status"] == "complete":
            evals = evaluations(out / "trials" / row["trial"])
            if evals:
                groups.setdefault(group_key(row), []).append(evals)
    return groups


def band(runs: list[list[dict]], x: str, y: str):
    """(grid, mean, min, max) of ``y`` over seeds, interpolated on a common grid of ``x`` up to the
    shortest run's end."""
    import numpy as np

    end = min(r[-1][x] for r in runs)
    grid = np.linspace(0, end, 50) if end > 0 else np.zeros(1)
    values = np.stack([np.interp(grid, [p[x] for p in r], [p.get(y, np.nan) for p in r]) for r in runs])
    return grid, values.mean(0), values.min(0), values.max(0)


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = curves(out, rows)
    names = heldout_names(metric_names(rows))
    colours = {g: plt.cm.tab20(i % 20) for i, g in enumerate(sorted(groups))}
    paths = []
    for x, label, file in (("nfe", "model evaluations (NFE)", "reward_vs_nfe.png"),
                           ("wall_s", "training wall time (s)", "reward_vs_time.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for group, runs in sorted(groups.items()):
            grid, mean, low, high = band(runs, x, TRAINED)
            ax.plot(grid, mean, color=colours[group], label=f"{group} (n={len(runs)})")
            ax.fill_between(grid, low, high, color=colours[group], alpha=0.15)
        ax.set(xlabel=label, ylabel="trained reward (evaluation prompts, mean)",
               title=f"Trained reward vs {label.split(' (')[0]}: mean over seeds, band = seed min-max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        paths.append(out / file)

    summary = summary_rows(rows)
    shown = ["reward"] + names
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(summary) + 2), 5))
    width = 0.8 / len(shown)
    for j, name in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(summary))]
        means = [e.get(name, float("nan")) for e in summary]
        stds = [e.get(f"{name}_std", 0.0) for e in summary]
        ax.bar(xs, means, width, yerr=stds, capsize=2,
               label=("trained reward" if name == "reward" else f"held-out: {name}") + " (after)")
        ax.scatter(xs, [e.get(f"{name}_before", float("nan")) for e in summary], marker="_", s=150, color="black",
                   zorder=3, label="before" if j == 0 else None)
    ax.set_xticks(range(len(summary)), [e["method"] for e in summary], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="reward (evaluation prompts, mean)", title="Final reward per method (whiskers: seed std; "
                                                             "black ticks: before training)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_reward.png", dpi=110)
    plt.close(fig)
    paths.append(out / "final_reward.png")

    panels = ["reward"] + names
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        key = metric_key(name)
        for group, runs in sorted(groups.items()):
            grid, mean, low, high = band(runs, "nfe", key)
            ax.plot(grid, mean, color=colours[group], label=group)
            ax.fill_between(grid, low, high, color=colours[group], alpha=0.12)
        ax.set(xlabel="model evaluations (NFE)", ylabel=f"{name} (mean)",
               title="trained reward" if name == "reward" else f"held-out reward: {name} (not trained)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Trained vs held-out rewards: reward hacking shows as the two diverging")
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=110)
    plt.close(fig)
    paths.append(out / "heldout.png")
    return paths
