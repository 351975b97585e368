"""Advantages: how much better each sample did than expected.

Group-relative (one scalar per sample, from the rewards of the G samples of its prompt):

  group   (r - mean) / (std + eps)     GRPO (Shao et al. 2024); std with Bessel's correction
                                       and eps = 1e-4, as TRL's GRPOTrainer
  center  r - mean                     Dr. GRPO (Liu et al. 2025): no std, no difficulty bias
  rloo    r - mean of the others       RLOO (Ahmadian et al. 2024) = G / (G - 1) (r - mean)

A failed sample (reward None or NaN: its rollout or its reward function failed) is left out of
its group's statistics and gets advantage 0 (its rows also get no loss). A group with one valid
sample has nothing to compare with: advantage 0.

Per token (PPO, Schulman et al. 2016): generalised advantage estimation over each row's
completion tokens from per-token rewards and the value head's predictions, then whitened over
the batch (InstructGPT / TRL PPOTrainer).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-4


def group_advantages(rewards_PG: np.ndarray, kind: str = 'group') -> np.ndarray:
  """[P, G] rewards (NaN = failed) -> [P, G] float32 advantages (module docstring)."""
  r = np.asarray(rewards_PG, np.float64)
  ok = np.isfinite(r)
  n = ok.sum(axis=1, keepdims=True)
  safe = np.where(ok, r, 0.0)
  mean = safe.sum(axis=1, keepdims=True) / np.maximum(n, 1)
  if kind == 'group':
    var = np.where(ok, (safe - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / np.maximum(n - 1, 1)
    adv = (safe - mean) / (np.sqrt(var) + EPS)
  elif kind == 'center':
    adv = safe - mean
  elif kind == 'rloo':
    adv = (safe - mean) * n / np.maximum(n - 1, 1)
  else:
    raise ValueError(f'config.align.advantage={kind!r}; expected group, center or rloo')
  return np.where(ok & (n > 1), adv, 0.0).astype(np.float32)


def gae(rewards_BT: np.ndarray, values_BT: np.ndarray, mask_BT: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
  """(advantages [B, T], returns [B, T]) by GAE over each row's masked tokens (its completion,
  contiguous): delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last token;
  A_t = delta_t + gamma lambda A_{t+1}; returns = A + V. Zero off the mask."""
  r, v, m = (np.asarray(a, np.float64) for a in (rewards_BT, values_BT, mask_BT))
  adv = np.zeros_like(r)
  running = np.zeros(r.shape[0])
  next_v = np.zeros(r.shape[0])
  for t in range(r.shape[1] - 1, -1, -1):
    on = m[:, t] > 0
    delta = r[:, t] + gamma * next_v - v[:, t]
    running = np.where(on, delta + gamma * lam * running, 0.0)
    adv[:, t] = running
    next_v = np.where(on, v[:, t], 0.0)
  return (adv * m).astype(np.float32), ((adv + v) * m).astype(np.float32)


def whiten(x_BT: np.ndarray, mask_BT: np.ndarray) -> np.ndarray:
  """(x - mean) / std over the masked entries (zero elsewhere)."""
  m = np.asarray(mask_BT, np.float64)
  n = max(m.sum(), 1.0)
  mean = (x_BT * m).sum() / n
  var = (((x_BT - mean) ** 2) * m).sum() / max(n - 1, 1.0)
  return ((x_BT - mean) / np.sqrt(var + 1e-8) * m).astype(np.float32)
