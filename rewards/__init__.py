"""Rewards: one interface, a registry by name, and a weighted combination."""

from rewards.base import (CombinedReward, Reward, RewardError, RewardOutput, available_rewards, build_reward,
                          build_rewards, register_reward)
from rewards import aesthetic, critique, dense, dino, jpeg, ocr, preference, toy, video, video_reward  # noqa: F401,E402,E501 - registers the built-in rewards

__all__ = ["CombinedReward", "Reward", "RewardError", "RewardOutput", "available_rewards", "build_reward",
           "build_rewards", "register_reward"]
