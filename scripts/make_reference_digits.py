"""Write reference images of one style for adversarial reward training (Adv-GRPO) on the embedded
toy model: digits of the train split drawn with thick strokes in one colour, 16 x 16 PNGs.

    python scripts/make_reference_digits.py runs/references/thick_blue --colour blue --thickness 1
    python scripts/make_reference_digits.py DIR --tiny-dino DIR/tiny_dino.pth   (also a random tiny DINO)

``--thickness k`` dilates each stroke by k pixels (a max filter of width 2k + 1) before colouring.
``--tiny-dino`` writes a random tiny DINOv2-style ViT for CPU runs (the adv_dino options for it are
rewards.tiny.TINY_DINO); real runs use DINOv2 weights (``checkpoint: hub`` or a local file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def thick_digits(colour: str, thickness: int, count: int, size: int = 16, seed: int = 0):
    """(count, 3, size, size) in [0, 1]: train-split digits, strokes dilated by ``thickness`` pixels."""
    import torch
    import torch.nn.functional as F

    from pipelines.toy import COLOURS, colour_digits, digit_split

    if colour not in COLOURS:
        raise SystemExit(f"--colour: {colour!r} is not a toy colour ({', '.join(COLOURS)})")
    images, _, _, _ = digit_split(seed)
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]
    coloured = colour_digits(images, torch.full((len(images),), COLOURS.index(colour)), size=size)
    if thickness > 0:
        k = 2 * thickness + 1
        coloured = F.max_pool2d(coloured, k, stride=1, padding=thickness)
    return coloured.clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for the PNGs")
    parser.add_argument("--colour", default="blue")
    parser.add_argument("--thickness", type=int, default=1)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--tiny-dino", help="also write a random tiny DINO checkpoint to this path")
    args = parser.parse_args()

    from torchvision.transforms.functional import to_pil_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = thick_digits(args.colour, args.thickness, args.count)
    for i, image in enumerate(images):
        to_pil_image(image).save(out / f"{i:04d}.png")
    print(f"wrote {len(images)} {args.colour} digits (strokes +{args.thickness} px) to {out}")
    if args.tiny_dino:
        from rewards.tiny import tiny_dino_checkpoint

        print(f"wrote {tiny_dino_checkpoint(args.tiny_dino, image_size=28)}")


if __name__ == "__main__":
    main()
