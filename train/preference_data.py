"""Preference data for reward models and DPO: records -> rows of (chosen, rejected) pairs.

Records (JSONL, one per line; `data.paths` / `data.pref_val_paths`, or a bundled task
`data.pref_task`, train/preference_tasks.py):

  {"prompt", "chosen", "rejected"}          a pair (optional "margin": a number, Llama 2's)
  {"prompt", "ranking": [best, ..., worst]} a ranking of K >= 2: its K(K-1)/2 pairs (InstructGPT)
  {"prompt", "completion", "score"}          a pointwise score (reward-model regression only)

A prompt is a string (then a response is [document start] + prompt, response + EOS, as SFT's
prompt/completion) or a list of chat messages (then responses are strings or lists of
assistant messages, formatted by the model's chat format). Pairs given as two whole
conversations ({"chosen": [...], "rejected": [...]}, no prompt) share their longest common
message prefix as the prompt (TRL's implicit prompt). Only the response's tokens are trained.

Rows: a unit is two rows of `seq_len + 1` tokens, [chosen | rejected] (a pointwise example's
second row is padding), one response per row from position 0. A response is truncated to
`seq_len` tokens (its start kept: one slot stays free, so a reward model can read the EOS);
one left with no trained token drops its unit; both are counted. The batch fields are those of
train/objectives/dpo.py and reward.py: tokens, loss_mask, rejected_tokens, rejected_loss_mask,
pair, score, margin.
"""
from __future__ import annotations

import hashlib
import itertools
import numbers
from typing import Any

import numpy as np

from model.inference.chat import Segments, check_messages
from train import sft_data

KINDS = ('pair', 'ranking', 'score')


def _kind(rec: Any, where: str) -> str:
  if not isinstance(rec, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(rec).__name__}')
  if 'chosen' in rec or 'rejected' in rec:
    return 'pair'
  if 'ranking' in rec:
    return 'ranking'
  if 'score' in rec:
    return 'score'
  raise ValueError(f'{where}: expected "chosen" + "rejected", "ranking" or "completion" + '
                   f'"score" keys, got {sorted(rec)[:6]}')


def _number(rec: dict, key: str, where: str, default=None) -> float:
  v = rec.get(key, default)
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
    raise ValueError(f'{where}: "{key}" must be a finite number, got {v!r:.60}')
  return float(v)


def response_segments(prompt: Any, response: Any, tok, chat, where: str,
                      allow_empty: bool = False) -> Segments:
  """(ids, trained) of one prompt + response; only the response is trained. `allow_empty`: an
  empty string response is the prompt then EOS (a sample that stopped at once, when scoring)."""
  if isinstance(prompt, str) and allow_empty and response == '' and prompt:
    return [([tok.doc_start_id] + tok.encode(prompt), False), ([tok.eos_id], True)]
  if isinstance(prompt, str):
    if not isinstance(response, str) or not response.strip():
      raise ValueError(f'{where}: a response to a string prompt must be a non-empty string, '
                       f'got {response!r:.60}')
    return sft_data.record_segments({'prompt': prompt, 'completion': response}, tok, chat, where)
  if not isinstance(prompt, list):
    raise ValueError(f'{where}: "prompt" must be a string or a list of messages, '
                     f'got {prompt!r:.60}')
  if isinstance(response, str):
    response = [{'role': 'assistant', 'content': response}]
  if not isinstance(response, list) or not response:
    raise ValueError(f'{where}: a response must be a string or a non-empty list of assistant '
                     f'messages, got {response!r:.60}')
  messages = list(prompt) + list(response)
  check_messages(messages, f'{where}: messages')
  if any(m['role'] != 'assistant' for m in response):
    raise ValueError(f'{where}: a response holds only assistant messages')
  head = len(chat.prompt_ids(prompt)) if prompt else 0
  out, at = [], 0
  for ids, trained in chat.segments(messages):   # Earlier assistant turns are context here.
    out.append((ids, trained and at >= head))
    at += len(ids)
  return out


def _implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  return chosen[:n], chosen[n:], rejected[n:]


def record_units(rec: Any, tok, chat, where: str) -> list[tuple[Segments, Segments | None, dict]]:
  """[(chosen segments, rejected segments or None, {'score', 'margin'})] of one record."""
  kind = _kind(rec, where)
  if kind == 'pair':
    chosen, rejected = rec.get('chosen'), rec.get('rejected')
    if chosen is None or rejected is None:
      raise ValueError(f'{where}: a pair needs both "chosen" and "rejected"')
    prompt = rec.get('prompt')
    if prompt is None:
      if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError(f'{where}: "prompt" is missing (only two whole conversations may omit '
                         'it)')
      prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    if chosen == rejected:
      raise ValueError(f'{where}: "chosen" and "rejected" are the same response')
    margin = _number(rec, 'margin', where, 0.0)
    return [(response_segments(prompt, chosen, tok, chat, where),
             response_segments(prompt, rejected, tok, chat, where),
             {'score': 0.0, 'margin': margin})]
  prompt = rec.get('prompt')
  if kind == 'ranking':
    ranking = rec['ranking']
    if not isinstance(ranking, list) or len(ranking) < 2:
      raise ValueError(f'{where}: "ranking" must list at least 2 responses, best first, got '
                       f'{ranking!r:.60}')
    segs = [response_segments(prompt, r, tok, chat, f'{where}: ranking[{i}]')
            for i, r in enumerate(ranking)]
    return [(segs[i], segs[j], {'score': 0.0, 'margin': 0.0})
            for i, j in itertools.combinations(range(len(segs)), 2)]
  score = _number(rec, 'score', where)
  return [(response_segments(prompt, rec.get('completion'), tok, chat, where), None,
           {'score': score, 'margin': 0.0})]


def _row(segs: Segments | None, seq_len: int, pad_id: int):
  """(tokens [W], loss [W], truncated) of one response in a row of W = seq_len + 1."""
  w = seq_len + 1
  tokens, loss = np.full(w, pad_id, np.int32), np.zeros(w, np.float32)
  if segs is None:
    return tokens, loss, False
  ids = [t for s, _ in segs for t in s]
  weights = [float(trained) for s, trained in segs for _ in s]
  truncated = len(ids) > seq_len
  ids, weights = ids[:seq_len], weights[:seq_len]
  tokens[:len(ids)] = ids
  loss[1:len(ids)] = weights[1:]   # The first token is no target.
  return tokens, loss, truncated


def lay_out(units, seq_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], dict]:
  """Streams of U units of 2W tokens, flattened: tokens, loss, pair, score, margin; and stats."""
  rows, truncated, dropped = [], 0, 0
  for chosen, rejected, meta in units:
    tc, lc, cut_c = _row(chosen, seq_len, pad_id)
    tr, lr, cut_r = _row(rejected, seq_len, pad_id)
    truncated += cut_c + cut_r
    if not lc.any() or (rejected is not None and not lr.any()):
      dropped += 1
      continue
    rows.append((np.concatenate([tc, tr]), np.concatenate([lc, lr]), float(rejected is not None),
                 meta['score'], meta['margin']))
  if not rows:
    raise ValueError(f'no preference example fits data.seq_len={seq_len}: {dropped} dropped')
  w2 = 2 * (seq_len + 1)
  out = {'tokens': np.concatenate([r[0] for r in rows]),
         'loss': np.concatenate([r[1] for r in rows])}
  for i, name in ((2, 'pair'), (3, 'score'), (4, 'margin')):
    out[name] = np.repeat(np.asarray([r[i] for r in rows], np.float32), w2)
  stats = dict(units=len(rows), pairs=int(sum(r[2] for r in rows)), truncated=truncated,
               dropped=dropped, trained_tokens=int(out['loss'].sum()))
  return out, stats


def unit_fields(tokens_BW: np.ndarray, extras_BW: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Batch fields of units [B, 2W] (a `Batches` window of 2W tokens)."""
  w = tokens_BW.shape[1] // 2
  loss = np.asarray(extras_BW['loss'], np.float32)
  return {'tokens': tokens_BW[:, :w], 'loss_mask': loss[:, 1:w],
          'rejected_tokens': tokens_BW[:, w:], 'rejected_loss_mask': loss[:, w + 1:],
          'pair': np.asarray(extras_BW['pair'][:, 0], np.float32),
          'score': np.asarray(extras_BW['score'][:, 0], np.float32),
          'margin': np.asarray(extras_BW['margin'][:, 0], np.float32)}


def load_records(data_cfg) -> dict[str, list[tuple[Any, str]]]:
  """{'train', 'validation'}: (record, where) from `data.pref_task` or JSONL `data.paths` /
  `data.pref_val_paths`."""
  from train import preference_tasks
  task = data_cfg.get('pref_task', '')
  if task:
    if task not in preference_tasks.PREFERENCE_TASKS:
      raise ValueError(f'data.pref_task={task!r}; expected one of '
                       f'{sorted(preference_tasks.PREFERENCE_TASKS)}')
    make = preference_tasks.PREFERENCE_TASKS[task]
    return {s: [(r, f'{task}/{s}/{i}') for i, r in enumerate(make(s))]
            for s in ('train', 'validation')}
  files = list(data_cfg.get('paths') or ())
  if not files:
    raise ValueError("data.source='preference' needs data.pref_task or data.paths (JSONL files)")
  from train import paths
  read = lambda f: paths.read_jsonl(f, 'preference data file')
  return {'train': [x for f in files for x in read(f)],
          'validation': [x for f in (data_cfg.get('pref_val_paths') or ()) for x in read(f)]}


def build_preference_data(cfg, workdir: str | None, process_index: int = 0,
                          process_count: int = 1, *, resume: dict | None = None,
                          resume_from: str = 'the checkpoint'):
  """A DataBundle of preference units (module docstring). Every record is checked first; only
  then is the workdir written (its copy of the tokenizer)."""
  from train import data as data_lib, paths
  d, t = cfg.data, cfg.train
  tok, save_tokenizer, chat = sft_data.base_tokenizer(d, workdir, resume, resume_from)
  streams, info = {}, {'source': 'preference', 'pref_task': d.get('pref_task', '')}
  for split, recs in load_records(d).items():
    if recs:
      units = [u for r, where in recs for u in record_units(r, tok, chat, where)]
      streams[split], info[f'{split}_stats'] = lay_out(units, d.seq_len, tok.pad_id)
  if 'train' not in streams:
    raise ValueError('the preference training split is empty')
  digest = hashlib.sha256()
  for split in sorted(streams):
    digest.update(streams[split]['tokens'].tobytes() + streams[split]['loss'].tobytes())
  w2 = 2 * (d.seq_len + 1)
  tr = streams['train']
  extras = lambda s: {k: v for k, v in s.items() if k != 'tokens'}
  train = data_lib.Batches(tr['tokens'], w2 - 1, t.batch_size, int(d.get('seed', 0)),
                           process_index, process_count, name='preference training units',
                           extras=extras(tr), make_fields=unit_fields)
  val = []
  if 'validation' in streams:
    v = streams['validation']
    toks = v['tokens'].reshape(-1, w2)
    ex = {k: a.reshape(-1, w2) for k, a in extras(v).items()}
    bs, limit = t.batch_size, int(t.get('eval_batches', 0) or 0)
    for i in range(0, len(toks), bs):
      if limit and len(val) == limit:
        break
      sl = slice(i, i + bs)
      val.append((unit_fields(sft_data._pad_rows(toks[sl], bs, tok.pad_id),   # pylint: disable=protected-access
                              {k: sft_data._pad_rows(a[sl], bs, 0)   # pylint: disable=protected-access
                               for k, a in ex.items()}), None))
  val_tokens = streams['validation']['tokens'] if 'validation' in streams else np.zeros(0, np.int32)
  info.update(fingerprint=digest.hexdigest(), tokenizer_vocab_size=tok.vocab_size,
              tokenizer_sha256=tok.digest, train_tokens=info['train_stats']['trained_tokens'],
              val_tokens=(info.get('validation_stats') or {}).get('trained_tokens', 0),
              val_bytes_per_token=float('nan'), val_coverage=1.0 if val else 0.0)
  if workdir:   # Every record checked: now the workdir may change.
    paths.makedirs(workdir)
    if save_tokenizer is not None:
      save_tokenizer()
  return data_lib.DataBundle(tok, train, val, info, tr['tokens'], val_tokens, [], float('nan'),
                             1.0 if val else 0.0)


def validation_units(bundle) -> int:
  """How many validation units the bundle's eval batches hold (padding excluded)."""
  return int(sum(float((f['loss_mask'].sum(axis=1) > 0).sum()) for f, _ in bundle.val))

