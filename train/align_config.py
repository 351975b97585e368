"""`config.align`: the hyperparameters of the alignment objectives (reward model, DPO family,
and the RL objectives that follow them). Defaults live here; configs/base.py copies them.

  beta             DPO's beta (KL strength; IPO's tau, SimPO's beta). TRL's default 0.1.
  dpo_loss         sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023, per-token
                   averaged log-ratios as TRL) | hinge (SLiC, Zhao et al. 2023) | simpo (Meng et
                   al. 2024: length-averaged log-probs, no reference, margin simpo_gamma)
  label_smoothing  conservative DPO (Mitchell 2023): the fraction of labels assumed flipped.
  simpo_gamma      SimPO's target margin gamma (the loss uses gamma / beta, as TRL's CPO).
  reward_center    RewardTrainer's center_rewards_coefficient (Eisenstein et al. 2023): a
                   penalty on the squared mean reward, keeping rewards centred on zero.
  rl_loss          how GRPO's per-token losses are averaged (train/objectives/grpo.py): grpo
                   (per sequence, then over sequences; Shao et al. 2024) | bnpo (over all
                   tokens) | dr_grpo (sum / (sequences x max_completion_len); Liu et al. 2025)
  clip_eps         PPO's ratio clip epsilon (Schulman et al. 2017); clip_eps_high > 0 sets the
                   upper bound separately (DAPO's clip-higher, Yu et al. 2025: 0.28)
  kl_coef          weight of the k3 estimate of KL(policy || reference) per token (Schulman
                   2020; DeepSeekMath's 0.04); 0 = no reference model
  kl_importance    weigh each token's k3 by the ratio pi / pi_old: the samples came from
                   pi_old, so this makes the KL estimate unbiased for pi (TRL's
                   use_bias_correction_kl, its default)
  max_completion_len  generated tokens per sample (dr_grpo's constant normaliser)

RL's rollouts (train/rl/, data.source='rollouts'):
  reward           what scores a sample (train/rewards.py): 'rule:NAME' (e.g. exact_match,
                   parses, passes), 'reward:WORKDIR' (a reward model), 'judge:WORKDIR[:RUBRIC]'
                   (RLAIF)
  reward_timeout_s a rule running longer fails that sample (logged), not the run
  group_size       samples per prompt (GRPO's G; train.batch_size counts samples)
  temperature      sampling temperature of the rollouts; log-probs are of logits / temperature
  advantage        group (reward minus its group's mean, over the group's std: GRPO) | center
                   (minus the mean only: Dr. GRPO) | rloo (minus the mean of the other samples:
                   Ahmadian et al. 2024); PPO uses GAE on its value head instead
  updates_per_rollout  optimizer steps on each rollout batch (TRL's num_iterations; the ratio
                   and its clip matter only past the first)
  vf_coef, vf_clip PPO's value-loss weight and the clip of the value change (Schulman 2017)
  gamma, gae_lambda  PPO's discount and GAE's lambda (Schulman et al. 2016)
"""
from __future__ import annotations

import dataclasses
from typing import Any

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge', 'simpo')
RL_LOSSES = ('grpo', 'bnpo', 'dr_grpo')
ADVANTAGES = ('group', 'center', 'rloo')


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  beta: float = 0.1
  dpo_loss: str = 'sigmoid'
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  reward_center: float = 0.0
  rl_loss: str = 'grpo'
  clip_eps: float = 0.2
  clip_eps_high: float = 0.0
  kl_coef: float = 0.04
  kl_importance: bool = True
  max_completion_len: int = 64
  reward: str = 'rule:exact_match'
  reward_timeout_s: float = 10.0
  group_size: int = 8
  temperature: float = 1.0
  advantage: str = 'group'
  updates_per_rollout: int = 1
  vf_coef: float = 0.1
  vf_clip: float = 0.2
  gamma: float = 1.0
  gae_lambda: float = 0.95

  @classmethod
  def from_config(cls, cfg: Any) -> 'AlignConfig':
    """From the run config's `align` section (absent: the defaults)."""
    section = cfg.get('align') if cfg is not None and hasattr(cfg, 'get') else None
    if section is None:
      return cls()
    d = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
