"""Write the edit prompt files of the embedded editing default (configs/prompts/toy_edit/): source
images drawn from the digits the toy edit model never saw (the held-out split), each with an
instruction of every kind in turn (recolour, thicker, thinner, another digit), as
``{"prompt": instruction, "image": "sources/NN.png"}`` lines of train.jsonl and eval.jsonl.

    python scripts/make_toy_edit_prompts.py [--train 32] [--eval 16] [--out configs/prompts/toy_edit]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_prompts(out: Path, counts: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Sources (PNG, 16 x 16) and one JSONL file per entry of ``counts`` (name -> edits); returns them."""
    import torch
    from PIL import Image

    from pipelines.toy import digit_split
    from pipelines.toy_edit import edit_pairs

    _, _, images, labels = digit_split()
    (out / "sources").mkdir(parents=True, exist_ok=True)
    kinds = ("colour", "thicker", "thinner", "digit")
    index = 0
    for name, count in counts.items():
        lines = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            g, rng = torch.Generator().manual_seed(seed * 1000 + index), random.Random(seed * 1000 + index)
            source, _, instructions, _ = edit_pairs(images, labels, 1, g, rng, mix={kind: 1.0})
            path = f"sources/{index:02d}.png"
            pixels = (source[0].permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(out / path)
            lines.append(json.dumps({"prompt": instructions[0], "image": path}))
            index += 1
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "configs/prompts/toy_edit")
    args = parser.parse_args()
    counts = write_prompts(args.out, {"train": args.train, "eval": args.eval}, args.seed)
    print(f"wrote {', '.join(f'{n} ({c} edits)' for n, c in counts.items())} to {args.out}")


if __name__ == "__main__":
    main()
