"""Reward commands of the ``align`` CLI: ``align rewards list`` and ``align score``."""

from __future__ import annotations

import argparse


def cmd_rewards_list(args: argparse.Namespace) -> int:
    from rewards.base import available_rewards, reward_class

    for name in available_rewards():
        cls = reward_class(name)
        kind = "differentiable" if cls.differentiable else "black-box"
        print(f"{name:28s} {kind:15s} dims={','.join(cls.dimensions)}")
    return 0


def register_commands(sub) -> None:
    rewards = sub.add_parser("rewards", help="reward registry")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    listing = rewards_sub.add_parser("list", help="list registered rewards")
    listing.set_defaults(func=cmd_rewards_list)
