"""Pruned test-time search against best-of-N at equal cost, on the embedded toy model.

For each seed: a pruned search (``--candidates`` start noises per prompt, pruning at ``--steps``
keeping ``--keep`` of each prompt's survivors, x0_hat scored with the search reward) runs over every
prompt; its cost per prompt (model evaluations + reward calls, a reward call = one model evaluation)
buys best-of-N with N = cost / (S + 1) candidates. The gain of a search is its mean best reward over
the prompts minus the mean reward of a single sample (the mean over all of best-of-N's candidates). Printed: a row per seed, the TTSnap default schedule's figure, and last
``pruned_vs_best_of_n_at_equal_cost=<gain of pruned / gain of best-of-N>`` (above 1: pruning wins).

    python bench/search.py [--reward stroke_thickness] [--seeds 3] [--candidates 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gains(adapter, reward: str, prompts, seeds: int, candidates: int, prune: str | None, keep: str, label: str):
    from align.config import load_config
    from align.commands.search import SearchConfig, equal_cost_candidates, search

    totals = [0.0, 0.0]
    for seed in range(seeds):
        base = [f"prompts=[{','.join(prompts)}]", f"seed={seed}", f"rewards=[{reward}]"]
        pruned_args = base + [f"num_candidates={candidates}", f"keep_fractions={keep}"]
        if prune is not None:
            pruned_args.append(f"prune_steps={prune}")
        pruned = search(adapter, load_config(SearchConfig, overrides=pruned_args))
        n = equal_cost_candidates(pruned.cost / len(prompts), adapter.default_steps)
        best_of_n = search(adapter, load_config(SearchConfig, overrides=base + [f"num_candidates={n}",
                                                                              "method=best_of_n"]))
        mean = float(best_of_n.final_scores.mean())  # every candidate of best-of-N: one sample's expectation
        gain_p, gain_b = float(pruned.best_scores[:, 0].mean()) - mean, float(best_of_n.best_scores[:, 0].mean()) - mean
        totals[0] += gain_p
        totals[1] += gain_b
        print(f"{label:>8s} seed {seed}: pruned best {mean + gain_p:.4f} (cost {pruned.cost / len(prompts):.0f}, "
              f"{candidates} candidates)  best-of-{n} {mean + gain_b:.4f} (cost {best_of_n.cost / len(prompts):.0f})  "
              f"one sample {mean:.4f}  gain ratio {gain_p / gain_b:.3f}")
    return totals[0] / totals[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="stroke_thickness")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--steps", default="[3,5,7]", help="pruning steps of the 10-step sampler")
    parser.add_argument("--keep", default="[0.25,0.5,0.5]", help="keep fraction at each pruning step")
    parser.add_argument("--prompts", type=int, default=None, help="the first N of the toy prompts (default: all)")
    args = parser.parse_args()

    import torch

    from align.training.run import TOY_PROMPTS
    from pipelines.toy import load_toy_adapter

    torch.set_num_threads(2)
    adapter = load_toy_adapter()
    prompts = list(TOY_PROMPTS)[:args.prompts]
    print(f"{len(prompts)} prompts, reward {args.reward}, {adapter.default_steps}-step ODE sampler")
    default = gains(adapter, args.reward, prompts, args.seeds, args.candidates, None, "[0.4,0.4,0.5]", "ttsnap")
    print(f"TTSnap default schedule (steps 1, 3, 6 of 10; keep 0.4, 0.4, 0.5): gain ratio {default:.3f}")
    ratio = gains(adapter, args.reward, prompts, args.seeds, args.candidates, args.steps, args.keep, "bench")
    print(f"schedule steps {args.steps} keep {args.keep}: gain ratio {ratio:.3f}")
    print(f"pruned_vs_best_of_n_at_equal_cost={ratio:.3f}")


if __name__ == "__main__":
    main()
