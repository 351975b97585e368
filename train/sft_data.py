"""Supervised fine-tuning data: demonstration records -> packed rows with a loss mask.

Records (JSONL, one per line; the first matching shape wins):

  {"prompt": ..., "completion": ...}                 the completion is trained
  {"messages": [{"role", "content"}, ...]}           every assistant message is trained
  {"instruction": ..., "input": ..., "output": ...}  Alpaca (Taori et al. 2023): its prompt
                                                     template, the output trained

A prompt/completion (and Alpaca) example is [document start] + prompt, then completion + EOS;
conversations go through the model's chat format (`model/inference/chat.py`: the checkpoint's
own template, else palmax's), the same one serving uses. Loss is on trained tokens only.

Packing: examples are laid into rows of `seq_len + 1` tokens in order, a new row when the next
one does not fit (never split across rows); each example in a row has its own segment id and
positions from 0, so it attends only to itself, exactly as if alone. An example longer than a
row is truncated to the row (`overflow='truncate'`, its start kept) or dropped ('drop'); either
way it is counted, and one left with no trained token is dropped. Padding has segment 0 and no
loss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np

from model.inference.chat import Segments, check_messages

ALPACA = ('Below is an instruction that describes a task. Write a response that appropriately '
          'completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n')
ALPACA_INPUT = ('Below is an instruction that describes a task, paired with an input that '
                'provides further context. Write a response that appropriately completes the '
                'request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n'
                '### Response:\n')
OVERFLOW = ('truncate', 'drop')


def _text(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
  v = rec.get(key)
  if not isinstance(v, str) or (not allow_empty and not v.strip()):
    raise ValueError(f'{where}: "{key}" must be a non-empty string, got {v!r:.60}')
  return v


def record_segments(rec: Any, tokenizer, chat, where: str) -> Segments:
  """(ids, trained) segments of one record; ValueError naming `where` (file:line) otherwise."""
  if not isinstance(rec, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(rec).__name__}')
  if 'messages' in rec:
    check_messages(rec['messages'], f'{where}: messages')
    if not any(m['role'] == 'assistant' for m in rec['messages']):
      raise ValueError(f'{where}: messages has no assistant message to train on')
    return chat.segments(rec['messages'])
  if 'prompt' in rec or 'completion' in rec:
    prompt, completion = _text(rec, 'prompt', where), _text(rec, 'completion', where)
  elif 'instruction' in rec:
    instruction, output = _text(rec, 'instruction', where), _text(rec, 'output', where)
    extra = rec.get('input', '')
    if not isinstance(extra, str):
      raise ValueError(f'{where}: "input" must be a string, got {extra!r:.60}')
    prompt = (ALPACA_INPUT if extra.strip() else ALPACA).format(instruction=instruction,
                                                                input=extra)
    completion = output
  else:
    raise ValueError(f'{where}: expected "prompt" + "completion", "messages", or "instruction" '
                     f'+ "output" keys, got {sorted(rec)[:6]}')
  return [([tokenizer.doc_start_id] + tokenizer.encode(prompt), False),
          (tokenizer.encode(completion) + [tokenizer.eos_id], True)]


def read_jsonl(path: str) -> list[tuple[Any, str]]:
  """(record, 'file:line') pairs of a JSONL file, blank lines skipped."""
  from train import paths
  return paths.read_jsonl(path, 'SFT data file')


@dataclasses.dataclass
class Packed:
  """Row-aligned streams of R rows of `window` = seq_len + 1 tokens, flattened to [R * window]:
  tokens, `loss` (weight of predicting each token from the one before it), `segment_ids` and
  `positions` (of each token as an input). `stats`: examples, rows, truncated, dropped, trained
  tokens and their UTF-8 bytes (for bits per byte)."""
  tokens: np.ndarray
  loss: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  window: int
  stats: dict


def pack(examples: Sequence[Segments], seq_len: int, pad_id: int, *, overflow: str = 'truncate',
         packing: bool = True) -> Packed:
  """Lays examples into rows (module docstring); `packing=False` gives one example per row."""
  if overflow not in OVERFLOW:
    raise ValueError(f'data.sft_overflow must be one of {OVERFLOW}, got {overflow!r}')
  window = seq_len + 1
  rows: list[list[tuple[list[int], list[float]]]] = []
  free = 0
  truncated = dropped = 0
  for segs in examples:
    ids = [t for seg, _ in segs for t in seg]
    weights = [float(trained) for seg, trained in segs for _ in seg]
    if len(ids) > window:
      if overflow == 'drop':
        dropped += 1
        continue
      ids, weights = ids[:window], weights[:window]
      truncated += 1
    if not any(weights[1:]):   # Nothing left to learn (the first token is never a target).
      dropped += 1
      continue
    if not packing or len(ids) > free:
      rows.append([])
      free = window
    rows[-1].append((ids, weights))
    free -= len(ids)
  if not rows:
    raise ValueError(f'no SFT example fits: {dropped} dropped (longer than data.seq_len + 1 = '
                     f'{window} tokens with data.sft_overflow=drop, or no trained token left)')
  r = len(rows)
  tokens = np.full((r, window), pad_id, np.int32)
  loss = np.zeros((r, window), np.float32)
  seg = np.zeros((r, window), np.int32)
  pos = np.zeros((r, window), np.int32)
  for i, row in enumerate(rows):
    at = 0
    for k, (ids, weights) in enumerate(row):
      n = len(ids)
      tokens[i, at:at + n] = ids
      loss[i, at + 1:at + n] = weights[1:]      # An example's first token has no context in it.
      seg[i, at:at + n] = k + 1
      pos[i, at:at + n] = np.arange(n)
      at += n
  stats = dict(examples=sum(len(x) for x in rows), rows=r, truncated=truncated, dropped=dropped,
               trained_tokens=int(loss.sum()))
  return Packed(tokens.reshape(-1), loss.reshape(-1), seg.reshape(-1), pos.reshape(-1), window,
                stats)


def trained_bytes(packed: Packed, tokenizer) -> int:
  """UTF-8 bytes of the trained tokens, for bits per byte; a trained EOS counts one byte (the
  newline that stands for it), as in pretraining's validation bits per byte."""
  total = 0
  toks, w = packed.tokens.reshape(-1, packed.window), packed.loss.reshape(-1, packed.window)
  for row_t, row_w in zip(toks, w):
    keep = row_t[row_w > 0]
    if keep.size:
      total += len(tokenizer.decode(keep.tolist()).encode('utf-8'))
      total += int((keep == tokenizer.eos_id).sum())
  return total


def chat_format(tokenizer, tokenizer_dir: str | None):
  """The checkpoint's own chat template when its HF tokenizer directory has one, else palmax's."""
  from model.inference.chat import JinjaChat, PalmaxChat
  from train import paths
  if tokenizer_dir:
    tc = paths.join(tokenizer_dir, 'tokenizer_config.json')
    if paths.exists(tc):
      meta = json.loads(paths.read_bytes(tc))
      if isinstance(meta.get('chat_template'), str):
        token = lambda t: t.get('content', '') if isinstance(t, dict) else (t or '')
        return JinjaChat(meta['chat_template'], tokenizer, token(meta.get('bos_token')),
                         token(meta.get('eos_token')))
  return PalmaxChat(tokenizer)


def load_records(data_cfg) -> dict[str, list[tuple[Any, str]]]:
  """{'train', 'validation'}: (record, where) pairs from `data.sft_task` (bundled), a prepared
  TFDS dataset `data.tfds_name` (splits `data.tfds_split` and `data.sft_tfds_val_split`), or the
  JSONL files `data.paths` (training) and `data.sft_val_paths` (validation)."""
  from train import sft_tasks
  task = data_cfg.get('sft_task', '')
  if task:
    if task not in sft_tasks.SFT_TASKS:
      raise ValueError(f'data.sft_task={task!r}; expected one of {sorted(sft_tasks.SFT_TASKS)}')
    make = sft_tasks.SFT_TASKS[task]
    return {s: [(r, f'{task}/{s}/{i}') for i, r in enumerate(make(s))]
            for s in ('train', 'validation')}
  if data_cfg.get('tfds_name'):   # A prepared TFDS dataset of records, by name.
    from train import corpus
    name, data_dir = data_cfg.tfds_name, data_cfg.get('tfds_data_dir') or None
    val_split = data_cfg.get('sft_tfds_val_split', 'validation')
    return {'train': corpus.tfds_records(name, data_cfg.get('tfds_split', 'train'), data_dir),
            'validation': corpus.tfds_records(name, val_split, data_dir) if val_split else []}
  files = list(data_cfg.get('paths') or ())
  if not files:
    raise ValueError("data.source='sft' needs data.sft_task, data.tfds_name or data.paths "
                     '(JSONL files)')
  out = {'train': [x for f in files for x in read_jsonl(f)],
         'validation': [x for f in (data_cfg.get('sft_val_paths') or ()) for x in read_jsonl(f)]}
  return out


def base_tokenizer(d, workdir: str | None, resume: dict | None, resume_from: str):
  """(tokenizer, its saver for the workdir or None, chat format) of the model being tuned:
  `data.tokenizer.path`, which must be the one a resumed checkpoint was trained with."""
  from train import paths, tokenizer as tokenizer_lib
  if not d.tokenizer.get('path'):
    raise ValueError(f'data.source={d.source!r} needs data.tokenizer.path: the tokenizer of the '
                     'model being tuned (configs/finetune.py and the configs built on it set it '
                     'from the base workdir)')
  tok, save_tokenizer = tokenizer_lib.resolve_tokenizer(d, [], workdir)
  if resume is not None:
    want = (resume.get('corpus') or {}).get('tokenizer_sha256')
    if want and want != tok.digest:
      from train.checkpoint import CheckpointMismatchError
      raise CheckpointMismatchError(f'data.tokenizer.path is not the tokenizer {resume_from} '
                                    'was trained with; resume with the original tokenizer')
  chat = chat_format(tok, d.tokenizer.path if paths.isdir(d.tokenizer.path) else None)
  return tok, save_tokenizer, chat


def build_sft_data(cfg, workdir: str | None, process_index: int = 0, process_count: int = 1, *,
                   resume: dict | None = None, resume_from: str = 'the checkpoint'):
  """A DataBundle of packed SFT rows (module docstring). Every record is checked first; only
  then is the workdir written (its copy of the tokenizer, which sampling and serving read)."""
  from train import data as data_lib
  d, t = cfg.data, cfg.train
  tok, save_tokenizer, chat = base_tokenizer(d, workdir, resume, resume_from)
  records = load_records(d)
  # A soft prompt's virtual tokens (model/peft/prompt.py) open every example, untrained.
  from train import peft_run
  ids = peft_run.prefix_ids(cfg, cfg.model)
  prefix = [(ids, False)] if ids else []
  packs, info = {}, {'source': 'sft', 'sft_task': d.get('sft_task', '')}
  for split, recs in records.items():
    if not recs:
      continue
    examples = [prefix + record_segments(r, tok, chat, where) for r, where in recs]
    packs[split] = pack(examples, d.seq_len, tok.pad_id, overflow=d.get('sft_overflow', 'truncate'),
                        packing=d.get('sft_packing', True))
    info[f'{split}_stats'] = packs[split].stats
  if 'train' not in packs:
    raise ValueError('the SFT training split is empty')
  digest = hashlib.sha256()
  for split in sorted(packs):
    digest.update(packs[split].tokens.tobytes() + packs[split].loss.tobytes())
  p = packs['train']
  extras = lambda q: {'loss': q.loss, 'segment_ids': q.segment_ids, 'positions': q.positions}
  train = data_lib.Batches(p.tokens, d.seq_len, t.batch_size, int(d.get('seed', 0)),
                           process_index, process_count, name='SFT training rows',
                           extras=extras(p))
  val, val_bpt, coverage, val_tokens = [], float('nan'), 0.0, np.zeros(0, np.int32)
  if 'validation' in packs:
    v = packs['validation']
    rows_t = v.tokens.reshape(-1, v.window)
    ex = {k: a.reshape(-1, v.window) for k, a in extras(v).items()}
    bs = t.batch_size
    limit = int(t.get('eval_batches', 0) or 0)
    n = len(rows_t) // bs * bs or len(rows_t)
    for i in range(0, n, bs):
      if limit and len(val) == limit:
        break
      sl = slice(i, i + bs)
      fields = data_lib.rows_fields(_pad_rows(rows_t[sl], bs, tok.pad_id),
                                    {k: _pad_rows(a[sl], bs, 0) for k, a in ex.items()})
      val.append((fields, None))
    covered = sum(float(f['loss_mask'].sum()) for f, _ in val)
    coverage = covered / max(v.stats['trained_tokens'], 1)
    val_bpt = trained_bytes(v, tok) / max(v.stats['trained_tokens'], 1)
    val_tokens = v.tokens
  info.update(fingerprint=digest.hexdigest(), tokenizer_vocab_size=tok.vocab_size,
              tokenizer_sha256=tok.digest, train_tokens=int(p.stats['trained_tokens']),
              val_tokens=int(packs['validation'].stats['trained_tokens']) if val else 0,
              val_bytes_per_token=val_bpt, val_coverage=coverage)
  if workdir:   # Every record checked and packed: now the workdir may change.
    from train import paths
    paths.makedirs(workdir)
    if save_tokenizer is not None:
      save_tokenizer()
  return data_lib.DataBundle(tok, train, val, info, p.tokens, val_tokens, [], val_bpt, coverage)


def _pad_rows(a: np.ndarray, rows: int, value) -> np.ndarray:
  """`a` [r, W] padded to `rows` rows of `value` (a last, short validation batch)."""
  if len(a) == rows:
    return a
  return np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], value, a.dtype)])
