"""Rewards: one interface, a registry by name, and a weighted combination."""

from rewards.base import (CombinedReward, Reward, RewardError, RewardOutput, available_rewards, build_reward,
                          build_rewards, register_reward)
from rewards import jpeg  # noqa: F401,E402 - registers the built-in rewards

__all__ = ["CombinedReward", "Reward", "RewardError", "RewardOutput", "available_rewards", "build_reward",
           "build_rewards", "register_reward"]
