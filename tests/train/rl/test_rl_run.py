"""RL through the real trainer (data.source='rollouts'): GRPO and PPO sample with the live
parameters, learn a reward, log what RL runs are read by, resume exactly, and survive a rollout
step that dies and a reward function that raises or hangs."""
import json
import time

import jax
import numpy as np
import pytest

from train import rewards, trainer

pytestmark = pytest.mark.slow


@rewards.rule('test_spaces')
def _spaces(prompt, completion, reference=None):
  """The fraction of characters that are spaces: dense, and easy to move."""
  del prompt, reference
  return completion.count(' ') / max(len(completion), 1)


@rewards.rule('test_flaky')
def _flaky(prompt, completion, reference=None):
  if reference == '3':
    raise RuntimeError('the rule broke')
  if reference == '5':
    time.sleep(5)
  return _spaces(prompt, completion)


@pytest.fixture(scope='module')
def prompt_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('rl') / 'prompts.jsonl'
  path.write_text(''.join(json.dumps({'prompt': f'def func_{i}(x, y={i % 4}):\n', 'answer': str(i)})
                          + '\n' for i in range(24)))
  return str(path)


def _cfg(base, prompts, objective='grpo', **train):
  from configs import grpo, ppo
  cfg = (ppo if objective == 'ppo' else grpo).get_config(base)
  cfg.data.update(sft_task='', paths=(prompts,), seq_len=24)
  cfg.align.update(reward='rule:test_spaces', max_completion_len=6, reward_timeout_s=1.0)
  if objective == 'grpo':
    cfg.align.update(group_size=4)
  cfg.train.update(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3,
                   checkpoint_every=3, eval_tasks='', peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.train.update(train)
  cfg.serve.update(num_slots=8, page_size=8, prefill_chunk=16)
  cfg.sample.update(max_new_tokens=4, num_samples=1)
  return cfg


def _history(result, key):
  return [h[key] for h in result.history if key in h]


@pytest.mark.parametrize('objective', ['grpo', 'ppo'])
def test_rl_learns_logs_and_resumes_exactly(objective, trained_workdir, prompt_file, tmp_path):
  base = trained_workdir[0]
  straight = str(tmp_path / 'straight')
  lines = []
  result = trainer.train(_cfg(base, prompt_file, objective, steps=8, eval_every=4,
                              checkpoint_every=4), straight, log=lines.append)
  reward = _history(result, 'reward')
  assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.05, reward
  logged = result.history[-1]
  for key in ('reward', 'kl', 'entropy', 'clip_fraction', 'completion_length', 'solved'):
    assert key in logged and np.isfinite(logged[key]), key
  assert any('reward ' in x and 'kl ' in x for x in lines)
  if objective == 'ppo':
    assert 'value_loss' in logged and _history(result, 'clip_fraction')[-1] >= 0

  resumed = str(tmp_path / 'resumed')
  cfg = _cfg(base, prompt_file, objective, steps=8, eval_every=4, checkpoint_every=4)
  trainer.train(cfg, resumed, log=lambda *_: None, stop_after=3)   # Mid-batch for PPO (mu=2).
  second = trainer.train(cfg, resumed, log=lambda *_: None)
  assert _history(second, 'reward') == reward[3:]
  from launch.workdir import load_model
  for a, b in zip(jax.tree.leaves(load_model(straight)[3]), jax.tree.leaves(load_model(resumed)[3])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_dying_rollout_step_and_a_broken_reward_fail_samples_not_the_run(
    trained_workdir, prompt_file, tmp_path, monkeypatch):
  from train.rl import policy as policy_lib
  calls = {'n': 0}

  def dies_once(self):
    calls['n'] += 1
    if calls['n'] == 3:   # Mid-generation of the first rollout: prefill done, decoding.
      raise RuntimeError('rollout worker killed')

  monkeypatch.setattr(policy_lib.Policy, 'step_hook', dies_once, raising=False)
  cfg = _cfg(trained_workdir[0], prompt_file, steps=3, eval_every=3, checkpoint_every=3)
  cfg.align.reward = 'rule:test_flaky'
  lines = []
  result = trainer.train(cfg, str(tmp_path / 'w'), log=lines.append)
  assert result.step == 3
  assert any('engine step failed (RuntimeError: rollout worker killed)' in x for x in lines)
  assert any('generation failed: RuntimeError: rollout worker killed' in x for x in lines)
  assert _history(result, 'rollout_failures')[0] >= 1
  text = '\n'.join(lines)
  if 'prompt 3 ' in text or 'prompt 5 ' in text:   # Whichever prompts the order drew.
    assert 'RuntimeError: the rule broke' in text or 'timed out after 1 s' in text
  assert all(np.isfinite(_history(result, 'loss')))


@pytest.mark.parametrize('field,value,match', [
    ('align.group_size', 3, 'batch_size=8 .* not divisible by config.align.group_size=3'),
    ('align.reward', 'rule:nope', "config.align.reward: 'rule:nope': no reward rule"),
    ('model.heads', (), "objective='ppo' needs config.model.heads to include 'value'"),
])
def test_bad_rl_configs_are_refused_in_one_line(field, value, match, trained_workdir, prompt_file,
                                               tmp_path):
  from model.config_rules import ConfigError
  from train import config_schema
  cfg = _cfg(trained_workdir[0], prompt_file, 'ppo' if field == 'model.heads' else 'grpo')
  section, key = field.split('.')
  cfg[section][key] = value
  with pytest.raises(ConfigError, match=match):
    config_schema.validate(cfg)
