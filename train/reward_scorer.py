"""A trained reward model as a scorer: (prompt, completion) pairs -> one float each, for
best-of-N, rejection sampling and RL rewards.

    scorer = RewardScorer.from_workdir('runs/tiny_rm')
    scorer.score([('def f(x):\n', '    return x\n'), ...])       # -> np.ndarray [N]

Each pair is laid out exactly as training laid out a preference response
(train/preference_data.py: [document start] + prompt, completion + EOS, or the chat format for
message prompts) and read at the same position (train/objectives/reward.py), so a score here is
the number the reward model was trained to produce. Rows are padded to a few fixed lengths (one
compiled program each) and scored in batches.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import heads


class RewardScorer:

  def __init__(self, graphdef, params, model_cfg, tokenizer, chat, batch_size: int = 16,
               max_len: int | None = None):
    if 'reward' not in model_cfg.heads:
      raise ValueError("the model has no 'reward' head: score with a workdir trained with "
                       "config.train.objective='reward' (configs/reward.py)")
    self.graphdef, self.params, self.model_cfg = graphdef, params, model_cfg
    self.tokenizer, self.chat = tokenizer, chat
    self.batch_size = batch_size
    self.max_len = max_len or model_cfg.max_seq_len

    def rewards(params, tokens_BT, at_B):
      model = nnx.merge(graphdef, params)
      x_BTD, _, _ = model.forward(tokens_BT, hidden=True)
      s_BT = heads.score(model, x_BTD, 'reward')
      return jnp.take_along_axis(s_BT, at_B[:, None], axis=1)[:, 0]

    self._rewards = jax.jit(rewards)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kw) -> 'RewardScorer':
    """The reward model a workdir holds (latest checkpoint, or `step`), on one device."""
    import json
    from model import sharding
    from train import paths, sft_data
    from train.scoring import load_params
    from train.tokenizer import load_workdir_tokenizer
    mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
    model_cfg, graphdef, params, _ = load_params(workdir, mesh, None, step=step)
    tok = load_workdir_tokenizer(workdir)
    hf_dir = paths.join(workdir, 'hf_tokenizer')
    chat = sft_data.chat_format(tok, hf_dir if paths.isdir(hf_dir) else None)
    cfg = json.loads(paths.read_bytes(paths.join(workdir, 'config.json')))
    kw.setdefault('max_len', int(cfg['data']['seq_len']))
    return cls(graphdef, params, model_cfg, tok, chat, **kw)

  def ids(self, prompt: Any, completion: Any) -> list[int]:
    """The tokens a (prompt, completion) is read as, cut to `max_len` (start kept)."""
    from train.preference_data import response_segments
    segs = response_segments(prompt, completion, self.tokenizer, self.chat, 'reward input',
                             allow_empty=True)
    return [t for s, _ in segs for t in s][:self.max_len]

  def score(self, pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
    """float32 [N]: the reward of each (prompt, completion)."""
    rows = [self.ids(p, c) for p, c in pairs]
    out = np.zeros(len(rows), np.float32)
    order = np.argsort([len(r) for r in rows], kind='stable')
    for i in range(0, len(rows), self.batch_size):
      idx = order[i:i + self.batch_size]
      width = _bucket(max(len(rows[j]) for j in idx), self.max_len)
      tokens = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
      at = np.zeros(self.batch_size, np.int32)
      for k, j in enumerate(idx):
        tokens[k, :len(rows[j])] = rows[j]
        at[k] = len(rows[j]) - 1   # The last token read: the completion's EOS.
      out[idx] = np.asarray(self._rewards(self.params, tokens, at))[:len(idx)]
    return out


def _bucket(n: int, cap: int) -> int:
  """The smallest power of two >= n (at least 16), capped at `cap`: few compiled shapes."""
  width = 16
  while width < n:
    width *= 2
  return max(min(width, cap), n)
