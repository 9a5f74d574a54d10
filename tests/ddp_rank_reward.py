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
    from accelerate.state import PartialState

    commands, current = [], []
    for word in sys.argv[1:] + ["+"]:
        if word == "+":
            commands.append(current)
            current = []
        else:
            current.append(word)
    # a finished run ends the process group (accelerate's end_training); the next command needs it
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    code = next((code for code in map(main, commands) if code), 0)
    destroy(PartialState())
    sys.exit(code)
