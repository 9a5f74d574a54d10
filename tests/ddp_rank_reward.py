"""``align`` with one more reward, for multi-process tests: ``rank_split`` scores brightness on
process 0 and a constant on every other process (all of their groups carry no signal)."""

import os
import sys

import torch

from align.commands.cli import main
from rewards.base import Reward, register_reward


@register_reward("rank_split")
class RankSplit(Reward):
    def score(self, samples, prompts, **context):
        brightness = samples.float().mean(dim=(1, 2, 3))
        if int(os.environ.get("RANK", "0")) == 0:
            return {"score": brightness}
        return {"score": torch.full_like(brightness, 0.5)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
