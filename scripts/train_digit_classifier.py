"""Train the digit classifier shipped in ``rewards/assets/digit_classifier.safetensors``.

Data: the train part of scikit-learn's ``load_digits`` (see ``pipelines.toy.digit_split``), upscaled to
16 x 16 and coloured, with augmentation so the classifier also holds on generated samples: small
rotations / scalings / shifts, arbitrary stroke colours and brightness, blur and noise. Prints the
accuracy on the held-out digits coloured with the palette. Runs in a couple of minutes on 2 CPU cores.

    python scripts/train_digit_classifier.py [--steps 1500] [--out rewards/assets/digit_classifier.safetensors]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.toy import COLOURS, colour_digits, digit_split, palette_tensor
from rewards.digit_classifier import CLASSIFIER_WEIGHTS, INPUT_SIZE, DigitClassifier


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Grey 8x8 digits (N, 8, 8) in [0, 1] -> augmented RGB (N, 3, 16, 16) in [0, 1]."""
    n = images.shape[0]
    size = INPUT_SIZE
    x = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)

    # random affine: rotation +-12 deg, scale 0.85..1.15, shift +-1.5 px
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.85 + 0.3 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (1.5 * 2 / size)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # sometimes blur (3x3 gaussian of random width)
    blur = torch.rand(n, generator=g) < 0.3
    if blur.any():
        s = 0.4 + 0.6 * torch.rand(int(blur.sum()), generator=g)
        k1 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0])[None] ** 2 / (2 * s[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)
        kernels = (k1[:, :, None] * k1[:, None, :])[:, None]                # (m, 1, 3, 3)
        xb = x[blur].transpose(0, 1)                                          # (1, m, H, W)
        x[blur] = F.conv2d(F.pad(xb, (1, 1, 1, 1), mode="replicate"), kernels, groups=kernels.shape[0]).transpose(0, 1)

    # stroke colour: a palette colour or a random one (largest channel 1), times a brightness
    rgb = torch.rand(n, 3, generator=g)
    rgb = rgb / rgb.amax(1, keepdim=True)
    palette = palette_tensor()
    use_palette = torch.rand(n, generator=g) < 0.5
    rgb[use_palette] = palette[torch.randint(0, len(COLOURS), (int(use_palette.sum()),), generator=g)]
    rgb = rgb * (0.55 + 0.45 * torch.rand(n, 1, generator=g))
    x = x * rgb[:, :, None, None]

    # noise and a faint background
    x = x + torch.rand(n, 1, 1, 1, generator=g) * 0.08 * torch.randn(x.shape, generator=g)
    x = x + torch.rand(n, 1, 1, 1, generator=g) * 0.06
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(images[i:i + 512]).argmax(-1) for i in range(0, len(images), 512)])
    return (pred == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=CLASSIFIER_WEIGHTS)
    args = parser.parse_args()

    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_x, train_y, test_x, test_y = digit_split()
    model = DigitClassifier()
    print(f"digit classifier: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_y)} train / {len(test_y)} held-out digits")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    colours = torch.arange(len(test_y)) % len(COLOURS)
    test_images = colour_digits(test_x, colours, size=INPUT_SIZE)
    start = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(0, len(train_y), (args.batch_size,), generator=g)
        logits = model(augment(train_x[idx], g))
        loss = F.cross_entropy(logits, train_y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out acc {accuracy(model, test_images, test_y):.4f}"
                  f"  ({time.time() - start:.0f}s)", flush=True)

    model.eval()
    aug_images = augment(test_x, torch.Generator().manual_seed(1))
    print(f"held-out accuracy: palette colours {accuracy(model, test_images, test_y):.4f}, "
          f"augmented {accuracy(model, aug_images, test_y):.4f}; trained in {time.time() - start:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
