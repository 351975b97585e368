"""The objective interface and its registry.

    objective = get(cfg.train.objective)(cfg)
    loss, metrics = objective.loss(forward, batch)      # inside the jitted step
    sums = objective.eval_sums(forward, batch)          # {'loss_sum', 'weight', ...}

`forward(tokens_BT, segment_ids_BT=None, positions_BT=None) -> logits_BTV` is the model's full
forward (`forward.hidden` the same up to the final norm, x_BTD; `forward.score(x_BTD, name)` a
scalar head's s_BT; `forward.reference` the frozen reference's logits, without gradient), and `forward.cross_entropy(tokens_BT, targets_BT, weights_BT, z_loss, **kw)` the same
forward fused with next-token cross-entropy (train/loss.py; the fast path for anything that is a
weighted next-token loss: no [B, T, V] logits); the train step wraps it so that the MoE balance and router z-losses of every call are
added to the objective's loss (every objective gets them without asking). A batch is a dict of
arrays with a leading batch axis, holding at least the fields the objective lists in `fields`:

    tokens       int32 [B, T+1]   inputs are [:, :-1], next-token targets [:, 1:]
    loss_mask    float32 [B, T]   per-target weights (0 = no loss)
    segment_ids  int32 [B, T]     which packed document each input token belongs to
    positions    int32 [B, T]     position of each input token within its document
"""
from __future__ import annotations

from typing import Any, Callable

import jax

Forward = Callable[..., jax.Array]
OBJECTIVES: dict[str, type['Objective']] = {}


def register(name: str):
  """Class decorator: makes the objective selectable as `config.train.objective=name`."""
  def add(cls):
    if name in OBJECTIVES and OBJECTIVES[name] is not cls:
      raise ValueError(f'objective {name!r} is registered twice')
    OBJECTIVES[name] = cls
    cls.name = name
    return cls
  return add


def get(name: str) -> type['Objective']:
  if name not in OBJECTIVES:
    from model.config_rules import ConfigError
    raise ConfigError(f'config.train.objective={name!r}; expected one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


class Objective:
  """Base class: subclasses set `fields` and implement `loss` (and `eval_sums` if their eval
  differs from a weighted mean of the loss). One that compares the policy with a frozen
  reference (DPO, RL) says so with `needs_reference`; `forward.reference` is then that model."""
  name = ''
  fields: tuple[str, ...] = ('tokens',)
  needs_reference = False
  data_source = ''   # The data it trains on: '' a text corpus, 'sft' or 'preference' records.
  row_fields: tuple[str, ...] = ()   # Fields with one value per row ([B]); the rest are [B, T].
  rows_per_example = 1   # Token rows one example holds (a preference pair: 2).

  def __init__(self, cfg: Any):
    self.cfg = cfg

  @classmethod
  def wants_reference(cls, align) -> bool:
    """Whether a run with `config.align` (train/align_config.py) needs a reference model."""
    return cls.needs_reference

  def batch_fields(self) -> tuple[str, ...]:
    """The fields this run's batches must carry (may depend on the config)."""
    return self.fields

  def loss(self, forward: Forward, batch: dict) -> tuple[jax.Array, dict]:
    """(scalar loss to minimise, {'loss': ..., other scalar metrics})."""
    raise NotImplementedError

  def eval_sums(self, forward: Forward, batch: dict) -> dict:
    """Sums over the batch that the trainer adds up over eval batches: 'loss_sum' and 'weight'
    give the eval loss as loss_sum / weight; any other 'X_sum' is reported as eval_X, divided
    by 'X_count' when given, else by 'weight'."""
    loss, metrics = self.loss(forward, batch)
    weight = metrics.get('weight', 1.0)
    return {'loss_sum': metrics.get('loss', loss) * weight, 'weight': weight}


class AlignObjective(Objective):
  """An objective tuned by `config.align` (train/align_config.py): reward, DPO, RL."""

  def __init__(self, cfg=None, align=None):
    super().__init__(cfg)
    from train.align_config import AlignConfig
    self.align = align or AlignConfig.from_config(cfg)
    self.needs_reference = self.wants_reference(self.align)


class RLObjective(AlignObjective):
  """An objective trained on the policy's own samples (train/rl/, data.source='rollouts'): a
  reference model when the KL to it is penalised. `per_token_advantages`: the rollout stage
  computes GAE per token (PPO) instead of one group-relative advantage per sample."""
  data_source = 'rollouts'
  per_token_advantages = False

  @classmethod
  def wants_reference(cls, align) -> bool:
    return align.kl_coef > 0
