"""HF checkpoint directory -> palmax workdir (the `--from=hf` half of launch/convert.py).

Everything that can be checked from headers (family, config, tensor names, shapes, dtypes) is
checked before anything is written; values are checked block by block while writing.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np

FLOAT_KINDS = ('float16', 'bfloat16', 'float32', 'float64')
HF_CONFIG_FILES = ('config.json', 'generation_config.json')


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: --src must be a HF checkpoint directory')
  with open(path) as f:
    return json.load(f)


def exact_cast(name: str, x: np.ndarray, dtype, hint: str) -> np.ndarray:
  """`x` as `dtype` if every value survives exactly, else ValueError naming the tensor."""
  dtype = np.dtype(dtype)
  if x.dtype.name not in FLOAT_KINDS:
    raise ValueError(f'tensor {name!r} has dtype {x.dtype.name}, which {dtype.name} parameters '
                     'cannot hold (a quantized checkpoint? palmax converts float weights only)')
  if x.dtype == dtype:
    return x
  y = x.astype(dtype)
  if not np.array_equal(y.astype(x.dtype), x, equal_nan=True):
    bad = np.flatnonzero(y.astype(x.dtype).ravel() != x.ravel())[0]
    raise ValueError(f'tensor {name!r} ({x.dtype.name}) has values {dtype.name} cannot hold '
                     f'exactly (e.g. {x.ravel()[bad]!r}); {hint}')
  return y


def _special_ids(hf_cfg: dict) -> dict:
  c = hf_cfg.get('text_config') or hf_cfg
  out = {}
  for k in ('bos', 'eos', 'pad'):
    v = c.get(f'{k}_token_id', hf_cfg.get(f'{k}_token_id'))
    out[k] = v[0] if isinstance(v, list) and v else v
  return out


def workdir_config(model_cfg, tokenizer_path: str):
  """The converted workdir's config.json: configs/base.py with the converted model."""
  from configs.base import get_base
  cfg = get_base()
  cfg.model.update(model_cfg.to_dict())
  cfg.data.tokenizer.path = tokenizer_path
  cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
  return cfg


def import_hf(src: str, out: str, family: str, *, param_dtype: str, final_dst: str, log=print):
  import jax
  from flax import nnx

  from launch.hf_files import HFCheckpoint
  from model import hf, hf_weights, transformer
  from train import checkpoint_stream as cs, optim
  from train.hf_tokenizer import HFTokenizer, has_tokenizer
  from train.tokenizer import HF_TOKENIZER_DIR

  hf_cfg = read_hf_config(src)
  found = hf.family_of(hf_cfg)
  if found != family:
    raise ValueError(f'--family={family} but {src}/config.json is a {found} checkpoint '
                     f'(model_type {hf_cfg.get("model_type")!r})')
  model_cfg = hf.config_from_hf(hf_cfg, param_dtype=param_dtype)
  ckpt = HFCheckpoint(src)
  used = hf_weights.check_source(ckpt, model_cfg)
  for name in sorted(used):
    exact_cast(name, np.zeros(0, ckpt.dtype(name)), param_dtype, '')   # dtype kind only
  ignored = sorted(set(ckpt.names()) - used)
  n = model_cfg.param_count()
  log(f'{family}: {n / 1e9:.3f}B parameters, {len(used)} HF tensors ({ckpt.format}) -> '
      f'{param_dtype}' + (f'; ignoring {len(ignored)} tensors ({", ".join(ignored[:4])}'
                          f'{", ..." if len(ignored) > 4 else ""})' if ignored else ''))

  # The leaves must be exactly the model's parameter tree (a mismatch is a bug here).
  abstract = nnx.split(transformer.abstract(model_cfg))[1].to_pure_dict()
  leaves = hf_weights.leaves(model_cfg)
  want = dict(_flatten(abstract))
  have = {leaf.path: leaf.shape for leaf in leaves}
  if {p: tuple(a.shape) for p, a in want.items()} != have:
    raise RuntimeError(f'hf_weights leaves differ from the model: {sorted(set(want) ^ set(have))}')

  hint = '--param_dtype=float32 holds it'

  def reader(leaf):
    dtype = want[leaf.path].dtype   # param_dtype; the router stays float32.

    def read(a, b):
      if not leaf.layers:
        return exact_cast(leaf.hf_name, hf_weights.read_block(leaf, ckpt, model_cfg, a, b),
                          dtype, hint)
      # Layer by layer, so an error names the HF tensor it came from.
      return np.concatenate([exact_cast(
          (hf_weights.hf_entries(leaf, model_cfg, leaf.layers[r]) or [(leaf.name,)])[0][0],
          hf_weights.read_block(leaf, ckpt, model_cfg, r, r + 1), dtype, hint)
          for r in range(a, b)])
    return cs.StreamedLeaf(leaf.shape, dtype, read, leaf.axis, leaf.name,
                           chunk_axes=(0,) if leaf.layers and len(leaf.shape) > 2 else ())

  params: dict = {}
  for leaf in leaves:
    node = params
    for p in leaf.path[:-1]:
      node = node.setdefault(p, {})
    node[leaf.path[-1]] = reader(leaf)

  # Tokenizer: carried as is (train/hf_tokenizer.py), so sampling and fine-tuning encode exactly
  # as the model was trained.
  tok_dir = os.path.join(out, HF_TOKENIZER_DIR)
  tok = None
  # The marker is written either way (load_workdir_tokenizer reads it), with the checkpoint's
  # special ids for a tokenizer copied in later that does not name them.
  marker = {'kind': 'hf', 'dir': HF_TOKENIZER_DIR, 'fallback_ids': _special_ids(hf_cfg)}
  if has_tokenizer(src):
    tok = HFTokenizer(src, fallback=_special_ids(hf_cfg))
    tok.save(tok_dir)
    marker.update(key=f'copied:{tok.digest}', source_path=src, vocab_size=tok.vocab_size,
                  model_sha256=tok.digest)
    log(f'tokenizer: {tok.kind}, {tok.vocab_size} tokens (eos {tok.eos_id}, bos {tok.bos_id})')
  else:
    log(f'note: {src} has no tokenizer.model or tokenizer.json; copy one into '
        f'{os.path.join(final_dst, HF_TOKENIZER_DIR)} to sample or fine-tune')
  with open(os.path.join(out, 'tokenizer.json'), 'w') as f:
    json.dump(marker, f, indent=1)

  cfg = workdir_config(model_cfg, os.path.join(final_dst, HF_TOKENIZER_DIR))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    f.write(cfg.to_json(indent=2))
  os.makedirs(os.path.join(out, 'hf'))
  for name in HF_CONFIG_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out, 'hf', name))
  dtypes = {name: ckpt.dtype(name).name for name in sorted(used)}
  with open(os.path.join(out, 'hf', 'conversion.json'), 'w') as f:
    json.dump({'family': family, 'source': src, 'format': ckpt.format,
               'dtype_counts': dict(Counter(dtypes.values())), 'dtypes': dtypes}, f, indent=1)

  # The train state the Checkpointer expects: zero Adam moments for the config's optimizer.
  tx, _ = optim.make_optimizer(cfg.train, cfg.train.steps)
  abs_opt = jax.eval_shape(tx.init, abstract)
  opt_state = jax.tree.map(
      lambda a: cs.zeros_leaf(a.shape, a.dtype) if a.ndim else np.zeros((), a.dtype),
      abs_opt)
  rng = np.asarray(jax.random.key_data(jax.random.key(cfg.train.seed + 1)))
  state = {'params': params, 'opt_state': opt_state, 'step': np.zeros((), np.int32), 'rng': rng}
  record = {'model': model_cfg.to_dict(), 'data': None,
            'corpus_fingerprint': f'converted-from-hf:{family}', 'hf_source': src}
  if tok is not None:   # Sampling refuses any other tokenizer (launch/workdir.check_tokenizer).
    record['corpus'] = {'tokenizer_sha256': tok.digest}
  cs.save_streamed(out, 0, state, record, log=log)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
