"""``align`` with one more reward, for multi-process tests: ``rank_split`` scores brightness on
process 0 and a constant on every other process (all of their groups carry no signal). Several
commands separated by ``+`` run one after another in the same processes (one launch for all)."""

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
    commands, current = [], []
    for word in sys.argv[1:] + ["+"]:
        if word == "+":
            commands.append(current)
            current = []
        else:
            current.append(word)
    sys.exit(next((code for code in map(main, commands) if code), 0))
