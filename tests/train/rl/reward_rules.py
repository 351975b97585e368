"""Reward rules that tests name as 'rule:tests.train.rl.reward_rules:FN' (imported by every
process of a run, as a user's own rules are)."""


def spaces(prompt, completion, reference=None):
  """The fraction of characters that are spaces: dense, and easy to move."""
  del prompt, reference
  return completion.count(' ') / max(len(completion), 1)
