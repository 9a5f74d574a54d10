"""Rewards: one interface, a registry by name, and a weighted combination."""

from rewards.base import CombinedReward, Reward, RewardError, RewardOutput, register_reward
from rewards.registry import available_rewards, build_reward, build_rewards, reward_class

__all__ = ["CombinedReward", "Reward", "RewardError", "RewardOutput", "available_rewards", "build_reward",
           "build_rewards", "register_reward", "reward_class"]
