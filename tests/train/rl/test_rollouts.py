"""The rollout stage with a scripted policy: prompt records, rows and masks, seeds, failures
(a generation that errored, a reward that raises or hangs) and the checkpointed position."""
import time

import numpy as np
import pytest

from train import rewards
from train.align_config import AlignConfig
from train.rl import rollouts
from train.rl.policy import Sample

EOS, PAD = 2, 0


class Tok:
  doc_start_id, eos_id, pad_id, vocab_size = 1, EOS, PAD, 100

  def encode(self, text):
    return [3 + (ord(c) % 90) for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + (i - 3) % 26) for i in ids)


class Chat:
  def prompt_ids(self, messages):
    return [1, 99] + [t for m in messages for t in Tok().encode(m['content'])] + [98]


class ScriptedPolicy:
  """Samples `length` tokens (seed-dependent ids) ending in EOS; rows listed in `errors` fail."""
  tokenizer = Tok()

  def __init__(self, errors=()):
    self.errors, self.requests = set(errors), []

  def sample(self, requests, log=print):
    self.requests.extend(requests)
    out = []
    for i, r in enumerate(requests):
      if i in self.errors:
        out.append(Sample([5], 'error', 'generation failed: boom'))
        continue
      n = 1 + r.sampling['seed'] % 3
      toks = [10 + (r.sampling['seed'] >> k) % 20 for k in range(min(n, r.max_tokens - 1))]
      out.append(Sample(toks + [EOS], 'stop'))
    return out

  def score(self, tokens, mask):
    return {'logps': -0.5 * mask}


def test_prompt_records():
  tok, chat = Tok(), Chat()
  p = rollouts.prompt_of({'prompt': 'ab', 'answer': '7'}, tok, chat, 'f:1')
  assert p.ids == (1, *tok.encode('ab')) and p.text == 'ab' and p.reference == '7'
  assert rollouts.prompt_of({'prompt': 'ab', 'completion': 'x'}, tok, chat, 'f:1').reference == 'x'
  m = rollouts.prompt_of({'messages': [{'role': 'user', 'content': 'hi'},
                                       {'role': 'assistant', 'content': 'yo'}]}, tok, chat, 'f:2')
  assert m.ids == tuple(chat.prompt_ids([{'role': 'user', 'content': 'hi'}])) and m.reference == 'yo'
  for bad, match in (([1], 'f:3: expected a JSON object'), ({'prompt': ' '}, 'f:3: "prompt"'),
                     ({'messages': [{'role': 'assistant', 'content': 'x'}]}, 'f:3: messages')):
    with pytest.raises(ValueError, match=match):
      rollouts.prompt_of(bad, tok, chat, 'f:3')


def _batches(n_prompts=5, rows=8, group=4, scorer=None, **align):
  tok = Tok()
  prompts = [rollouts.prompt_of({'prompt': f'q{i}', 'answer': str(i)}, tok, Chat(), f'p{i}')
             for i in range(n_prompts)]
  a = AlignConfig(group_size=group, max_completion_len=4, **align)
  scorer = scorer or rewards.RuleScorer(lambda p, c, r: float(len(c) % 2), timeout_s=2)
  return rollouts.RolloutBatches(prompts, 12, rows, a, scorer, PAD, EOS, seed=3)


def test_rows_masks_advantages_and_seeds():
  b = _batches()
  policy = ScriptedPolicy()
  f = b.next_rows(policy)
  assert f['tokens'].shape == (8, 13) and f['loss_mask'].shape == (8, 12)
  for r in range(8):
    req, toks = policy.requests[r], f['tokens'][r]
    n = len(req.prompt)
    assert list(toks[:n]) == list(req.prompt)
    completion = list(toks[n:][toks[n:] != PAD])
    assert completion[-1] == EOS
    assert np.flatnonzero(f['loss_mask'][r]).tolist() == list(range(n - 1, n - 1 + len(completion)))
  # Two prompts x 4 samples, each with its own seed; the same position re-seeds identically.
  assert len({q.sampling['seed'] for q in policy.requests}) == 8
  assert policy.requests[0].prompt == policy.requests[3].prompt != policy.requests[4].prompt
  assert rollouts.sample_seed(3, 0, 1) == policy.requests[1].sampling['seed']
  np.testing.assert_allclose(f['advantages'].reshape(2, 4).sum(1), 0, atol=1e-5)
  np.testing.assert_array_equal(f['old_logps'], -0.5 * f['loss_mask'])
  assert set(b.metrics) >= {'reward', 'solved', 'no_signal_groups', 'rollout_failures'}
  # An epoch is a seeded permutation: every prompt once before any repeats.
  seen = [tuple(q.prompt) for q in policy.requests[::4]]
  b.next_rows(policy)
  b.next_rows(policy)
  seen = [tuple(q.prompt) for q in policy.requests[::4]]
  assert len(set(seen[:5])) == 5


def test_failed_samples_are_logged_and_get_no_loss():
  def rule(prompt, completion, reference):
    if reference == '1':
      raise RuntimeError('bad rule')
    if reference == '0' and len(completion) == 2:
      time.sleep(3)
    return 1.0
  b = _batches(n_prompts=2, scorer=rewards.RuleScorer(rule, timeout_s=0.5))
  lines = []
  policy = ScriptedPolicy(errors=(0,))
  f = b.next_rows(policy, lines.append)
  failed = [r for r in range(8) if not f['loss_mask'][r].any()]
  raising = [r for r in range(8) if tuple(policy.requests[r].prompt) == (1, *Tok().encode('q1'))]
  assert len(raising) == 4 and set(raising) | {0} <= set(failed)   # Prompt 1's rule raises.
  assert any('timed out after 0.5 s' in x for x in lines)
  assert b.metrics['rollout_failures'] == len(failed) == len(lines)
  assert any('generation failed: boom' in x for x in lines)
  assert any('RuntimeError: bad rule' in x for x in lines)
  assert (f['advantages'][failed] == 0).all()


def test_state_restores_the_position_and_a_pending_batch():
  b = _batches(updates_per_rollout=2)
  policy = ScriptedPolicy()
  first = b.next_rows(policy)
  saved = b.state()
  again = b.next_rows(policy)          # The same batch's second use.
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  after = b.next_rows(policy)
  c = _batches(updates_per_rollout=2)
  c.restore(saved)
  policy2 = ScriptedPolicy()
  for want in (again, after):
    got = c.next_rows(policy2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert len(policy2.requests) == 8   # Only the second rollout was sampled again.
