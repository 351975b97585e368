"""Reinforcement learning on the policy's own samples (GRPO, RLOO, PPO): prompts -> rollouts
through the serving engine -> rewards (train/rewards.py) -> advantages -> the objective's
batch (train/objectives/grpo.py, ppo.py), all inside the one trainer (data.source='rollouts')."""
