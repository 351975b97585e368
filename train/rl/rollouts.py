"""The 'rollouts' data source: each training step's batch is sampled from the policy itself.

Prompts are records as SFT reads them (train/sft_data.py: `data.sft_task`, e.g. 'arithmetic',
or JSONL `data.paths`): {"prompt": str or chat messages, "answer": reference} (a record without
"answer" uses its "completion", or a conversation's last assistant message, as the reference
the reward rule may read). Each step takes the next batch_size / G prompts (a seeded
permutation per epoch), and then

  1. samples G completions of each through the serving engine at `align.temperature`, each with
     a seed from (data.seed, prompt position, sample): a row's tokens depend on nothing else, so
     a resumed run samples exactly what the uninterrupted run would have;
  2. scores them with `align.reward` (train/rewards.py); a sample whose generation or reward
     failed is logged, gets no loss, and stays out of its group's statistics;
  3. computes advantages (train/rl/advantages.py) and the policy's log-probs of its samples
     (old_logps), or for PPO per-token GAE advantages from the value head and a KL-shaped
     reward (InstructGPT), and lays out rows: [prompt | completion | padding] of seq_len + 1
     tokens, the loss mask on the completion (EOS included).

With `align.updates_per_rollout` = mu > 1 a batch serves mu optimizer steps (the ratio moves
away from 1 after the first); the batch waiting for its next use is part of the checkpointed
data state, so resuming mid-way is exact too.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from train.align_config import AlignConfig
from train.rl import advantages as adv_lib

ROW_FIELDS = ('rewards',)


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: tuple[int, ...]   # what the policy continues ([document start] + prompt, or the chat's)
  text: str              # what a reward function reads
  reference: Any         # the record's answer (or tests) for rule rewards; None if it has none


def prompt_of(rec: Any, tok, chat, where: str) -> Prompt:
  """A record (module docstring) as a Prompt; ValueError naming `where` otherwise."""
  from model.inference.chat import check_messages
  if not isinstance(rec, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(rec).__name__}')
  if 'messages' in rec and 'prompt' not in rec:
    msgs = rec['messages']
    check_messages(msgs, f'{where}: messages')
    ref = None
    if msgs and msgs[-1]['role'] == 'assistant':
      msgs, ref = msgs[:-1], msgs[-1]['content']
    if not msgs:
      raise ValueError(f'{where}: messages holds no prompt before the assistant\'s reply')
    return Prompt(tuple(chat.prompt_ids(msgs)), msgs[-1]['content'], rec.get('answer', ref))
  prompt = rec.get('prompt')
  if isinstance(prompt, list):
    check_messages(prompt, f'{where}: prompt')
    return Prompt(tuple(chat.prompt_ids(prompt)), prompt[-1]['content'],
                  rec.get('answer', rec.get('completion')))
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f'{where}: "prompt" must be a non-empty string or a list of messages, '
                     f'got {prompt!r:.60}')
  return Prompt(tuple([tok.doc_start_id] + tok.encode(prompt)), prompt,
                rec.get('answer', rec.get('completion')))


def sample_seed(seed: int, position: int, g: int) -> int:
  digest = hashlib.sha256(f'rollout\0{seed}\0{position}\0{g}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little')


class RolloutBatches:
  """`next_rows(policy, log)` -> the objective's fields for one step (numpy, all rows: every
  process samples the same global batch); `state()` / `restore()` for checkpoints; `metrics`:
  the last rollout's reward, accuracy and failure figures."""
  policy_driven = True

  def __init__(self, prompts: list[Prompt], seq_len: int, batch_size: int, align: AlignConfig,
               scorer, pad_id: int, eos_id: int, seed: int = 0, per_token: bool = False,
               use_reference: bool = False, kl_coef: float = 0.0):
    self.prompts, self.seq_len, self.align, self.scorer = prompts, seq_len, align, scorer
    self.rows, self.group = batch_size, align.group_size
    self.pad_id, self.eos_id, self.seed = pad_id, eos_id, seed
    self.per_token, self.use_reference, self.kl_coef = per_token, use_reference, kl_coef
    self.cursor = 0          # prompts consumed so far (over all epochs)
    self.pending: dict | None = None   # a batch awaiting more updates, and its uses left
    self.metrics: dict = {}

  # ---- checkpointed position --------------------------------------------------------------
  def state(self) -> dict:
    out = {'kind': 'rollouts', 'cursor': self.cursor}
    if self.pending is not None:
      out['pending'] = {'uses_left': self.pending['uses_left'], 'metrics': self.pending['metrics'],
                        'fields': {k: {'dtype': str(v.dtype), 'shape': list(v.shape),
                                       'values': v.ravel().tolist()}
                                   for k, v in self.pending['fields'].items()}}
    return out

  def restore(self, state: dict) -> None:
    self.cursor = int(state['cursor'])
    p = state.get('pending')
    self.pending = None if p is None else {
        'uses_left': int(p['uses_left']), 'metrics': dict(p['metrics']),
        'fields': {k: np.asarray(f['values'], f['dtype']).reshape(f['shape'])
                   for k, f in p['fields'].items()}}

  # ---- one step's batch -------------------------------------------------------------------
  def _next_prompts(self, n: int) -> list[tuple[int, Prompt]]:
    out = []
    for _ in range(n):
      epoch, i = divmod(self.cursor, len(self.prompts))
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
      out.append((self.cursor, self.prompts[int(order[i])]))
      self.cursor += 1
    return out

  def next_rows(self, policy, log=print) -> dict[str, np.ndarray]:
    if self.pending is None:
      fields, metrics = self._rollout(policy, log)
      self.pending = {'fields': fields, 'metrics': metrics,
                      'uses_left': self.align.updates_per_rollout}
    fields, self.metrics = self.pending['fields'], dict(self.pending['metrics'])
    self.pending['uses_left'] -= 1
    if self.pending['uses_left'] <= 0:
      self.pending = None
    return fields

  def _rollout(self, policy, log) -> tuple[dict, dict]:
    from model.inference.engine import GenerationRequest
    a, g, width = self.align, self.group, self.seq_len + 1
    chosen = self._next_prompts(self.rows // g)
    requests = []
    for position, p in chosen:
      room = min(a.max_completion_len, self.seq_len - len(p.ids))
      for k in range(g):
        requests.append(GenerationRequest(
            p.ids, room, sampling={'temperature': a.temperature,
                                   'seed': sample_seed(self.seed, position, k)}))
    samples = policy.sample(requests, log)
    tokens = np.full((self.rows, width), self.pad_id, np.int32)
    mask = np.zeros((self.rows, width - 1), np.float32)
    texts = []
    for r, ((_, p), s) in enumerate(zip([c for c in chosen for _ in range(g)], samples)):
      row = list(p.ids) + s.tokens
      tokens[r, :len(row)] = row
      mask[r, len(p.ids) - 1:len(row) - 1] = 1.0
      body = s.tokens[:-1] if s.tokens and s.tokens[-1] == self.eos_id else s.tokens
      texts.append(policy.tokenizer.decode(body))
    flat = [p for _, p in chosen for _ in range(g)]
    rewards = np.full(self.rows, np.nan)
    failed = {r: s.error for r, s in enumerate(samples) if s.finish == 'error'}
    ok = [r for r in range(self.rows) if r not in failed]
    if ok:
      scores, failures = self.scorer([flat[r].text for r in ok], [texts[r] for r in ok],
                                     [flat[r].reference for r in ok])
      for r, v in zip(ok, scores):
        if v is not None:
          rewards[r] = v
      for f in failures:
        failed[ok[f.index]] = f'reward failed: {f.reason}'
    for r in sorted(failed):
      log(f'rollout: prompt {chosen[r // g][0]} sample {r % g} failed ({failed[r]}); it gets '
          'no loss')
      mask[r] = 0.0
    fields = {'tokens': tokens, 'loss_mask': mask}
    scored = policy.score(tokens, mask)
    fields['old_logps'] = scored['logps']
    if self.per_token:
      fields.update(self._gae(rewards, mask, scored))
    else:
      fields['advantages'] = adv_lib.group_advantages(rewards.reshape(-1, g), a.advantage).ravel()
    valid = rewards[np.isfinite(rewards)]
    by_group = rewards.reshape(-1, g)
    flat_groups = [row[np.isfinite(row)] for row in by_group]
    metrics = {
        'reward': float(valid.mean()) if valid.size else float('nan'),
        'reward_std': float(valid.std()) if valid.size else float('nan'),
        'solved': float((valid > 0).mean()) if valid.size else float('nan'),
        'no_signal_groups': float(np.mean([len(x) < 2 or np.ptp(x) == 0 for x in flat_groups])),
        'truncated': float(np.mean([s.finish == 'length' for s in samples])),
        'rollout_failures': float(len(failed)),
    }
    if self.per_token and self.use_reference:   # PPO's KL sits in its reward: report it here.
      metrics['kl'] = float(((scored['logps'] - scored['ref_logps']) * mask).sum() /
                            max(mask.sum(), 1.0))
    return fields, metrics

  def _gae(self, rewards: np.ndarray, mask: np.ndarray, scored: dict) -> dict:
    """PPO's per-token fields: the sequence reward on its last token, minus kl_coef x the
    per-token log-ratio to the reference (InstructGPT's shaped reward), GAE over the value
    head's predictions, advantages whitened over the batch."""
    a = self.align
    per_token = np.zeros_like(mask)
    if self.use_reference:
      per_token -= self.kl_coef * (scored['logps'] - scored['ref_logps']) * mask
    last = np.where(mask.any(axis=1), mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), -1)
    for r, t in enumerate(last):
      if t >= 0 and np.isfinite(rewards[r]):
        per_token[r, t] += rewards[r]
    adv, ret = adv_lib.gae(per_token, scored['values'], mask, a.gamma, a.gae_lambda)
    return {'advantages': adv_lib.whiten(adv, mask), 'returns': ret,
            'old_values': scored['values'].astype(np.float32)}


def build_rollout_data(cfg, workdir: str | None, process_index: int = 0, process_count: int = 1,
                       *, resume: dict | None = None, resume_from: str = 'the checkpoint'):
  """A DataBundle whose `train` is a RolloutBatches over the prompt records. Every record is
  read and the reward resolved before the workdir is written (its copy of the tokenizer)."""
  del process_index, process_count   # Every process samples the whole batch (same seeds).
  from train import data as data_lib, objectives, paths, rewards, sft_data
  d, t = cfg.data, cfg.train
  a = AlignConfig.from_config(cfg)
  tok, save_tokenizer, chat = sft_data.base_tokenizer(d, workdir, resume, resume_from)
  records = sft_data.load_records(d)['train']
  prompts = [prompt_of(rec, tok, chat, where) for rec, where in records]
  # A prompt must leave room for a whole completion: one cut short would only teach stopping.
  fits = [p for p in prompts if len(p.ids) + a.max_completion_len <= d.seq_len]
  if not fits:
    raise ValueError(f'no prompt leaves room for config.align.max_completion_len='
                     f'{a.max_completion_len} tokens within data.seq_len={d.seq_len} '
                     f'({len(prompts)} prompts, the shortest {min(len(p.ids) for p in prompts)} '
                     'tokens)')
  scorer = rewards.make_scorer(a.reward, timeout_s=a.reward_timeout_s)
  objective = objectives.get(t.objective)
  digest = hashlib.sha256()
  for p in fits:
    digest.update(np.asarray(p.ids, np.int32).tobytes() + repr(p.reference).encode() + b'\0')
  train = RolloutBatches(fits, d.seq_len, t.batch_size, a, scorer, tok.pad_id, tok.eos_id,
                         seed=int(d.get('seed', 0)),
                         per_token=getattr(objective, 'per_token_advantages', False),
                         use_reference=objective.wants_reference(a), kl_coef=a.kl_coef)
  info = {'source': 'rollouts', 'fingerprint': digest.hexdigest(), 'prompts': len(fits),
          'prompts_too_long': len(prompts) - len(fits), 'reward': a.reward,
          'train_tokens': sum(len(p.ids) for p in fits), 'val_tokens': 0,
          'tokenizer_vocab_size': tok.vocab_size, 'tokenizer_sha256': tok.digest,
          'val_bytes_per_token': float('nan'), 'val_coverage': 0.0}
  if workdir:
    paths.makedirs(workdir)
    if save_tokenizer is not None:
      save_tokenizer()
  return data_lib.DataBundle(tok, train, [], info, np.zeros(0, np.int32), np.zeros(0, np.int32),
                             [], float('nan'), 0.0)
