"""Train the embedded editing model shipped in ``pipelines/assets/toy_edit_flow``.

Data: the train part of scikit-learn's digits (``pipelines.toy.digit_split``) as (source, target,
instruction) triples of ``pipelines.toy_edit.edit_pairs``: a coloured 16 x 16 digit, moved by at
most a pixel, and its recoloured, thickened, thinned or changed-digit version in the same place
("make it blue", "make it thicker", "turn it into a 7"); 10% of the instructions are empty, with
the source as target. Model: the image toy's UNet with the source image concatenated to its input
(``ToyFlowModel(condition_channels=3)``). Loss: rectified flow with logit-normal sigma, as
``scripts/train_toy.py``; the saved weights are an EMA. About 23 minutes on 2 CPU cores with the
defaults (0.35 s a step); ``scripts/check_toy_edit.py`` measures the result.

    python scripts/train_toy_edit.py [--steps 4000] [--out pipelines/assets/toy_edit_flow]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_toy's helpers

from pipelines.toy import ToyFlowModel, ToyTokenizer, digit_split  # noqa: E402
from pipelines.toy_edit import EDIT_VOCAB, TOY_EDIT_WEIGHTS_DIR, edit_pairs  # noqa: E402
from train_toy import flow_matching_step, warmup_cosine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TOY_EDIT_WEIGHTS_DIR)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    train_x, train_y, _, _ = digit_split()
    model = ToyFlowModel(vocab_size=len(EDIT_VOCAB), condition_channels=3)
    tokenizer = ToyTokenizer(model.config.max_tokens, vocab=EDIT_VOCAB)
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"toy edit model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps)
    start, running = time.time(), 0.0
    for step in range(1, args.steps + 1):
        model.train()
        source, target, instructions, _ = edit_pairs(train_x, train_y, args.batch_size, g, rng)
        loss = flow_matching_step(model, ema, opt, sched, target * 2 - 1, tokenizer(instructions), step, args.ema,
                                  g, condition=source * 2 - 1)
        running = loss if step == 1 else 0.98 * running + 0.02 * loss
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {running:.4f}  ({time.time() - start:.0f}s)", flush=True)
        if step % 500 == 0 or step == args.steps:  # a kill loses at most 500 steps of weights
            ema.eval()
            args.out.mkdir(parents=True, exist_ok=True)
            ema.save_pretrained(str(args.out), safe_serialization=True)
    weights = args.out / "diffusion_pytorch_model.safetensors"
    print(f"trained in {time.time() - start:.0f}s; saved {args.out} ({weights.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
