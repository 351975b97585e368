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
"""
from __future__ import annotations

import dataclasses
from typing import Any

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge', 'simpo')


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  beta: float = 0.1
  dpo_loss: str = 'sigmoid'
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  reward_center: float = 0.0

  @classmethod
  def from_config(cls, cfg: Any) -> 'AlignConfig':
    """From the run config's `align` section (absent: the defaults)."""
    section = cfg.get('align') if cfg is not None and hasattr(cfg, 'get') else None
    if section is None:
      return cls()
    d = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
