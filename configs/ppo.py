"""PPO (train/objectives/ppo.py) of a workdir's model on its own samples (train/rl/), with a
value head on the policy's trunk and GAE, the KL to the reference in the reward (InstructGPT):
the bundled arithmetic task by default, as configs/grpo.py (which it starts from).

  python -m launch.main --config=configs/ppo.py:runs/arith_sft --workdir=runs/arith_ppo

A base without a value head gets a freshly initialised one (train/reference.py:init_params).
"""
from configs import grpo


def get_config(workdir: str = ''):
  cfg = grpo.get_config(workdir)
  cfg.model.heads = ('value',)
  # One sample per prompt (the value head is the baseline), TRL PPOTrainer's value settings,
  # and a few updates per rollout so that the clip has something to clip.
  cfg.align.update(group_size=1, vf_coef=0.1, vf_clip=0.2, gamma=1.0, gae_lambda=0.95,
                   kl_coef=0.05, updates_per_rollout=2)
  cfg.train.update(objective='ppo')
  return cfg
