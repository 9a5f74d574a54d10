"""Train the independent digit judge shipped in ``rewards/assets/digit_judge.safetensors``.

The judge (``rewards/digit_judge.py``: an MLP over 8 x 8 intensities) learns from the *held-out* part of
``pipelines.toy.digit_split``, the part the toy model and the reward classifier never saw, with the
classifier's augmentation (shift / rotation / scale, colours, blur, noise). It is scored on the other
part, the classifier's training digits, which it never saw. Prints that accuracy and how often the
judge and the classifier agree. Under a minute on 2 CPU cores.

    python scripts/train_digit_judge.py [--steps 3000] [--out rewards/assets/digit_judge.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the classifier's augmentation

from train_digit_classifier import augment  # noqa: E402

from pipelines.toy import COLOURS, colour_digits, digit_split  # noqa: E402
from rewards.digit_classifier import load_digit_classifier  # noqa: E402
from rewards.digit_judge import JUDGE_WEIGHTS, DigitJudge  # noqa: E402


@torch.no_grad()
def predictions(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + 512]).argmax(-1) for i in range(0, len(images), 512)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    args = parser.parse_args()

    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    unseen_x, unseen_y, judge_x, judge_y = digit_split()  # the judge trains on the classifier's held-out part
    model = DigitJudge()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    test_images = colour_digits(unseen_x, torch.arange(len(unseen_y)) % len(COLOURS), size=16)
    start = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(0, len(judge_y), (args.batch_size,), generator=g)
        loss = F.cross_entropy(model(augment(judge_x[idx], g)), judge_y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps:
            acc = (predictions(model, test_images) == unseen_y).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.4f}  accuracy on unseen digits {acc:.4f}", flush=True)
    judged = predictions(model, test_images)
    classified = predictions(load_digit_classifier(), test_images)
    augmented = augment(unseen_x, torch.Generator().manual_seed(1))
    print(f"judge: {len(judge_y)} training digits; on the {len(unseen_y)} it never saw: accuracy "
          f"{(judged == unseen_y).float().mean():.4f} (augmented "
          f"{(predictions(model, augmented) == unseen_y).float().mean():.4f}), agreement with the reward "
          f"classifier {(judged == classified).float().mean():.4f}; {time.time() - start:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
