"""Train the embedded toy video model shipped in ``pipelines/assets/toy_video_flow``.

Data: the train part of scikit-learn's digits (``pipelines.toy.digit_split``) as 8-frame videos of
the digit (16 pixels wide) crossing a 32 x 32 canvas (``pipelines.toy_video.moving_digits``) in a random direction and
palette colour, with prompts such as "a red digit 7 moving left" (the image toy's templates plus
"moving <direction>"); 10% of the prompts are dropped (classifier-free guidance) and 10% leave out
the direction or the colour. Loss: rectified flow with logit-normal sigma, as
``scripts/train_toy.py``; the saved weights are an EMA. About 25 minutes on 2 CPU cores with the
defaults; ``scripts/check_toy_video.py`` measures the result.

    python scripts/train_toy_video.py [--steps 3200] [--out pipelines/assets/toy_video_flow]
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

from pipelines.toy import COLOURS, NUMBER_WORDS, PROMPT_TEMPLATES, ToyTokenizer, digit_split  # noqa: E402
from pipelines.toy_video import (DIRECTIONS, TOY_VIDEO_WEIGHTS_DIR, VIDEO_VOCAB, ToyVideoFlowModel,  # noqa: E402
                                 moving_digits)
from train_toy import flow_matching_step, warmup_cosine  # noqa: E402


def make_video_prompt(digit: int, colour: str, direction: str, rng: random.Random, p_drop: float = 0.1,
                      p_partial: float = 0.1) -> str:
    r = rng.random()
    d = NUMBER_WORDS[digit] if rng.random() < 0.5 else str(digit)
    if r < p_drop:
        return ""
    motion = f"moving {direction}" if rng.random() < 0.8 else f"going {direction}"
    if r < p_drop + p_partial / 2:  # no direction
        return rng.choice(PROMPT_TEMPLATES).format(d=d, c=colour)
    if r < p_drop + p_partial:  # no colour
        return f"a digit {d} {motion}"
    return f"{rng.choice(PROMPT_TEMPLATES).format(d=d, c=colour)} {motion}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TOY_VIDEO_WEIGHTS_DIR)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    directions = list(DIRECTIONS)

    train_x, train_y, _, _ = digit_split()
    model = ToyVideoFlowModel()
    tokenizer = ToyTokenizer(model.config.max_tokens, vocab=VIDEO_VOCAB)
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"toy video model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps)
    start, running = time.time(), 0.0
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(0, len(train_y), (args.batch_size,), generator=g)
        colour_ids = torch.randint(0, len(COLOURS), (args.batch_size,), generator=g)
        moves = [directions[int(i)] for i in torch.randint(0, 4, (args.batch_size,), generator=g)]
        video = moving_digits(train_x[idx], colour_ids, moves, generator=g)  # (B, F, 3, H, W)
        x0 = video.permute(0, 2, 1, 3, 4) * 2 - 1
        prompts = [make_video_prompt(int(d), COLOURS[int(c)], m, rng) for d, c, m in zip(train_y[idx], colour_ids, moves)]
        loss = flow_matching_step(model, ema, opt, sched, x0, tokenizer(prompts), step, args.ema, g)
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
