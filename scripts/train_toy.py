"""Train the embedded toy flow model shipped in ``pipelines/assets/toy_flow``.

Data: the train part of scikit-learn's ``load_digits`` (``pipelines.toy.digit_split``), upscaled to
16 x 16, strokes coloured with a random palette colour on black, randomly shifted by up to one pixel,
with prompts drawn from ``pipelines.toy.PROMPT_TEMPLATES`` ("a red digit 7", "the number seven in red",
...). 10% of the prompts are dropped (empty prompt, for classifier-free guidance) and 10% name only the
digit or only the colour.

Loss: rectified flow, ``|v_theta(x_sigma, 1000 sigma) - (eps - x0)|^2`` with
``x_sigma = (1 - sigma) x0 + sigma eps`` and logit-normal sigma; the saved weights are an EMA.
About 10 minutes on 2 CPU cores with the defaults.

    python scripts/train_toy.py [--steps 3000] [--out pipelines/assets/toy_flow] [--grid grid.png]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import torch

from pipelines.toy import (COLOURS, NUMBER_WORDS, PROMPT_TEMPLATES, TOY_WEIGHTS_DIR, ToyAdapter, ToyFlowModel,
                           ToyTokenizer, colour_digits, digit_split)

DIGIT_ONLY_TEMPLATES = ("a digit {d}", "the number {d}", "{d}", "a handwritten {d}", "an image of the digit {d}")
COLOUR_ONLY_TEMPLATES = ("a {c} digit", "a {c} number", "a {c} drawing", "something {c}")


def make_prompt(digit: int, colour: str, rng: random.Random, p_drop: float = 0.1, p_partial: float = 0.1) -> str:
    r = rng.random()
    d = NUMBER_WORDS[digit] if rng.random() < 0.5 else str(digit)
    if r < p_drop:
        return ""
    if r < p_drop + p_partial / 2:
        return rng.choice(DIGIT_ONLY_TEMPLATES).format(d=d)
    if r < p_drop + p_partial:
        return rng.choice(COLOUR_ONLY_TEMPLATES).format(c=colour)
    return rng.choice(PROMPT_TEMPLATES).format(d=d, c=colour)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 200) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over min(warmup, steps / 10) steps, then a cosine from 1 to 0.1 of the rate."""
    warmup = min(warmup, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def flow_matching_step(model, ema, opt, sched, x0: torch.Tensor, ids: torch.Tensor, step: int, ema_decay: float,
                       generator: torch.Generator, condition: torch.Tensor | None = None) -> float:
    """One rectified-flow update, |v(x_sigma, 1000 sigma) - (eps - x0)|^2 with logit-normal sigma and
    x_sigma = (1 - sigma) x0 + sigma eps (gradient clipped at 1), then the EMA (decay warming up to
    ``ema_decay``). ``condition``: the image-conditioned model's input image. Returns the loss."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    kwargs = {} if condition is None else {"condition": condition}
    loss = (model((1 - s) * x0 + s * eps, sigma * 1000, ids, **kwargs) - (eps - x0)).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)
    return loss.item()


@torch.no_grad()
def euler_sample(adapter: ToyAdapter, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Plain Euler integration of the flow ODE from noise to images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = adapter.initial_noise(len(prompts), generator=g)
    cond = adapter.encode(prompts, guidance_scale=guidance)
    sched = adapter.schedule(steps)
    for i in range(len(sched)):
        v = adapter.predict(x, sched.timesteps[i], cond)
        x = x + v * (sched.levels[i + 1] - sched.levels[i])
    return adapter.decode(x)


def evaluate(model: ToyFlowModel, steps: int, guidance: float, seed: int = 0, per_digit: int = 10):
    """Samples per_digit images of every digit in rotating colours; returns (images, prompts, accuracy or
    None when no classifier is available)."""
    adapter = ToyAdapter(model.eval())
    prompts = [f"a {COLOURS[(d + k) % len(COLOURS)]} digit {d}" for k in range(per_digit) for d in range(10)]
    images = euler_sample(adapter, prompts, steps, guidance, seed)
    try:
        from rewards.digit_classifier import predict_digits

        digits = torch.tensor([d for _ in range(per_digit) for d in range(10)])
        acc = (predict_digits(images) == digits).float().mean().item()
    except FileNotFoundError:
        acc = None
    return images, prompts, acc


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(arr).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TOY_WEIGHTS_DIR)
    parser.add_argument("--grid", type=Path, default=None, help="write a 10x10 sample grid PNG here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    train_x, train_y, _, _ = digit_split()
    model = ToyFlowModel()
    tokenizer = ToyTokenizer(model.config.max_tokens)
    size = model.config.sample_size
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"toy flow model: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_y)} train digits")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps)
    start = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(0, len(train_y), (args.batch_size,), generator=g)
        colour_ids = torch.randint(0, len(COLOURS), (args.batch_size,), generator=g)
        x0 = colour_digits(train_x[idx], colour_ids, size=size, shift=1, generator=g) * 2 - 1
        prompts = [make_prompt(int(d), COLOURS[int(c)], rng) for d, c in zip(train_y[idx], colour_ids)]
        loss = flow_matching_step(model, ema, opt, sched, x0, tokenizer(prompts), step, args.ema, g)
        running = loss if step == 1 else 0.98 * running + 0.02 * loss
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  ({time.time() - start:.0f}s)",
                  flush=True)
    train_time = time.time() - start

    ema.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(str(args.out), safe_serialization=True)
    weights = args.out / "diffusion_pytorch_model.safetensors"
    print(f"trained in {train_time:.0f}s; saved {args.out} ({weights.stat().st_size / 1e6:.2f} MB)")

    images, prompts, acc = evaluate(ema, ToyAdapter.default_steps, ToyAdapter.default_guidance)
    if acc is not None:
        print(f"classifier accuracy on 100 samples ({ToyAdapter.default_steps} steps, guidance "
              f"{ToyAdapter.default_guidance}): {acc:.2f}")
    if args.grid is not None:
        save_grid(images, args.grid)
        print(f"sample grid: {args.grid}")


if __name__ == "__main__":
    main()
