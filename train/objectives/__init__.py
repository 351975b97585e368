"""Training objectives, chosen by `config.train.objective` through one registry.

An objective says which batch fields it needs and computes `loss, metrics` from a `forward`
function and a batch; the trainer never names one. Adding an objective (SFT, DPO, distillation,
a reward model) is one new module here that calls `register`, plus its import below.
"""
from train.objectives.base import OBJECTIVES, Objective, get, register
from train.objectives import lm  # noqa: E402  (registers 'lm')
from train.objectives import sft  # noqa: E402  (registers 'sft')
from train.objectives import reward  # noqa: E402  (registers 'reward')
from train.objectives import dpo  # noqa: E402  (registers 'dpo')
from train.objectives import grpo  # noqa: E402  (registers 'grpo')
from train.objectives import ppo  # noqa: E402  (registers 'ppo')

__all__ = ['OBJECTIVES', 'Objective', 'get', 'register', 'lm', 'sft', 'reward', 'dpo', 'grpo', 'ppo']
