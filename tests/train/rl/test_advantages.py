"""Advantages against TRL's own lines (GRPOTrainer's group scaling, RLOOTrainer's leave-one-out
baseline, both NaN-aware) and GAE against the recursion written out per row."""
import numpy as np
import pytest

from train.rl import advantages as adv_lib

torch = pytest.importorskip('torch')


def _rewards():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 4))
  r[1, 2] = np.nan                 # a failed sample
  r[2, :] = 0.5                    # a group with no signal
  r[3, 1:] = np.nan                # a group with one valid sample
  return r


def test_group_advantages_equal_trl_grpo():
  from trl.trainer.utils import nanstd
  r = _rewards()
  rewards = torch.tensor(r.ravel())
  grouped = rewards.view(-1, 4)
  mean = torch.nanmean(grouped, dim=1).repeat_interleave(4, dim=0)
  std = nanstd(grouped, dim=1).repeat_interleave(4, dim=0)
  want = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0).numpy().reshape(5, 4)
  got = adv_lib.group_advantages(r, 'group')
  ok = np.isfinite(r) & (np.isfinite(r).sum(1, keepdims=True) > 1)
  np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
  assert (got[~ok] == 0).all() and (got[2] == 0).all()


def test_rloo_advantages_equal_trl_rloo():
  r = _rewards()
  grouped = torch.tensor(r)
  counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
  baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
  want = torch.nan_to_num(grouped - baselines, nan=0.0, posinf=0.0, neginf=0.0).numpy()
  np.testing.assert_allclose(adv_lib.group_advantages(r, 'rloo'), want, rtol=1e-6, atol=1e-6)


def test_center_is_reward_minus_group_mean():
  r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 6.0, np.nan]])
  np.testing.assert_allclose(adv_lib.group_advantages(r, 'center'),
                             [[0.5, -0.5, -0.5, 0.5], [-2.0, 0.0, 2.0, 0.0]])
  with pytest.raises(ValueError, match='config.align.advantage'):
    adv_lib.group_advantages(r, 'ppo')


def test_gae_equals_the_recursion_on_each_completion():
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))
  mask = np.zeros((3, 9))
  spans = [(2, 7), (0, 9), (4, 5)]
  for r, (a, b) in enumerate(spans):
    mask[r, a:b] = 1
  gamma, lam = 0.9, 0.8
  adv, ret = adv_lib.gae(rewards, values, mask, gamma, lam)
  for r, (a, b) in enumerate(spans):   # TRL PPOTrainer's loop over the completion's tokens.
    last, want = 0.0, []
    for t in reversed(range(a, b)):
      next_v = values[r, t + 1] if t < b - 1 else 0.0
      delta = rewards[r, t] + gamma * next_v - values[r, t]
      last = delta + gamma * lam * last
      want.append(last)
    np.testing.assert_allclose(adv[r, a:b], want[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[r, a:b], adv[r, a:b] + values[r, a:b], rtol=1e-5, atol=1e-6)
  assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
  w = adv_lib.whiten(adv, mask)
  on = mask > 0
  assert abs(w[on].mean()) < 1e-6 and w[on].std(ddof=1) == pytest.approx(1.0, rel=1e-4)
