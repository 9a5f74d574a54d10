"""The shipped toy edit model's figures at its default settings (10 Euler steps, CFG 3), on sources
drawn from the digits it never saw (the held-out split), every edit kind in turn:

* instruction -- the independent judge's reading (``edit_judge``): the new colour is the stroke's
  nearest palette colour, the ink grew or shrank, the judge reads the new digit;
* preservation -- the fraction of the attributes the instruction keeps (digit, colour, position)
  that the edit kept;
* the same two figures on the data's own targets (the judge's ceiling), and the reward
  classifier's reading of new digits.

    python scripts/check_toy_edit.py [--per-kind 40] [--grid grid.png]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("colour", "thicker", "thinner", "digit")


@dataclass
class EditFigures:
    #: edits the judge finds doing what the instruction asks, per kind and overall
    instruction: dict[str, float] = field(default_factory=dict)
    #: mean fraction of the kept attributes (digit, colour, position) the edits kept, per kind and overall
    preservation: dict[str, float] = field(default_factory=dict)
    #: the same two figures on the data's own targets
    data_instruction: float = 0.0
    data_preservation: float = 0.0
    #: digit edits whose new digit the reward classifier reads
    classifier_digit: float = 0.0


def held_out_edits(per_kind: int, seed: int = 0):
    """``per_kind`` (source, target, prompt) triples of every edit kind on the held-out digits:
    (sources, targets, prompts carrying their sources, kinds)."""
    import random

    import torch

    from pipelines.base import Prompt
    from pipelines.toy import digit_split
    from pipelines.toy_edit import edit_pairs

    _, _, images, labels = digit_split()
    sources, targets, prompts, kinds = [], [], [], []
    for k, kind in enumerate(KINDS):
        g = torch.Generator().manual_seed(seed * 100 + k)
        source, target, instructions, _ = edit_pairs(images, labels, per_kind, g, random.Random(seed * 100 + k),
                                                     mix={kind: 1.0})
        sources.append(source)
        targets.append(target)
        prompts += [Prompt(text, image) for text, image in zip(instructions, source)]
        kinds += [kind] * per_kind
    return torch.cat(sources), torch.cat(targets), prompts, kinds


def measure(adapter, per_kind: int = 40, seed: int = 0):
    """(:class:`EditFigures`, edits, sources, prompts) of the adapter's ODE samples at its defaults."""
    import torch

    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.toy_edit import parse_edit
    from rewards import build_reward
    from rewards.digit_classifier import predict_digits

    sources, targets, prompts, kinds = held_out_edits(per_kind, seed)
    judge = build_reward("edit_judge")
    with torch.no_grad():
        out = rollout(adapter, adapter.encode(prompts), RolloutConfig(num_steps=adapter.default_steps, kernel="ode"),
                      generator=torch.Generator().manual_seed(seed))
        edits = adapter.decode(out.samples)
    scores, data = judge(edits, prompts).scores, judge(targets, prompts).scores
    figures = EditFigures(data_instruction=float(data["instruction"].mean()),
                          data_preservation=float(data["preservation"].mean()))
    for kind in KINDS:
        rows = torch.tensor([k == kind for k in kinds])
        figures.instruction[kind] = float(scores["instruction"][rows].mean())
        figures.preservation[kind] = float(scores["preservation"][rows].mean())
    figures.instruction["all"] = float(scores["instruction"].mean())
    figures.preservation["all"] = float(scores["preservation"].mean())
    digit_rows = [i for i, k in enumerate(kinds) if k == "digit"]
    wanted = torch.tensor([parse_edit(prompts[i])[1] for i in digit_rows])
    figures.classifier_digit = float((predict_digits(edits[digit_rows]) == wanted).float().mean())
    return figures, edits, sources, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--grid", default=None, help="write sources above their edits (8 of each kind) here")
    args = parser.parse_args()

    import torch

    from pipelines.toy_edit import load_toy_edit_adapter

    figures, edits, sources, prompts = measure(load_toy_edit_adapter(args.model_path), args.per_kind)
    print(f"{len(prompts)} edits of held-out digits ({args.per_kind} per kind):")
    for kind in (*KINDS, "all"):
        print(f"{kind:>8}: instruction {figures.instruction[kind]:.1%}  preservation {figures.preservation[kind]:.1%}")
    print(f"the data's own targets: instruction {figures.data_instruction:.1%}  "
          f"preservation {figures.data_preservation:.1%}")
    print(f"reward classifier: the new digit in {figures.classifier_digit:.1%} of digit edits")
    if args.grid:
        from align.media import write_strip

        pick = [k * args.per_kind + i for k in range(len(KINDS)) for i in range(min(8, args.per_kind))]
        write_strip(torch.stack([sources[pick], edits[pick]], dim=1), args.grid)
        print(f"grid: {args.grid} (each row a source and its edit: {', '.join(prompts[i] for i in pick[:4])}, ...)")


if __name__ == "__main__":
    main()
