"""palmax workdir -> HF checkpoint directory (the `--to=hf` half of launch/convert.py).

Leaves are read a layer slab (or row block) at a time from the orbax checkpoint and written
straight into safetensors shards, so memory stays at about one layer whatever the model size.
"""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


def _hf_config(src: str, model_cfg, family: str, extra: dict, log) -> dict:
  """The carried HF config.json when it still describes the model, else one from `config_to_hf`."""
  from model import hf
  carried = os.path.join(src, 'hf', 'config.json')
  if os.path.isfile(carried):
    with open(carried) as f:
      orig = json.load(f)
    try:  # A multimodal Gemma 3 config would ask for the vision tower: write a text one.
      same = (orig.get('model_type') != 'gemma3' and hf.family_of(orig) == family and
              hf.config_from_hf(orig, **hf.runtime_overrides(model_cfg)) == model_cfg)
    except ValueError:
      same = False
    if same:
      return orig
    log(f'note: {carried} no longer matches the model (or family); writing a new config.json')
  return hf.config_to_hf(model_cfg, family, **extra)


def make_cast(dtype: str, recorded: dict[str, str], default: np.dtype):
  """cast(name, block): to the requested dtype; 'auto' = the dtype recorded at import, exactly."""
  def target(name: str) -> np.dtype:
    if dtype == 'auto':
      return np.dtype(DTYPES.get(recorded.get(name), default))
    return np.dtype(DTYPES[dtype])

  def cast(name: str, x: np.ndarray) -> np.ndarray:
    t = target(name)
    if x.dtype == t:
      return x
    with np.errstate(over='ignore'):
      y = x.astype(t)
    if np.isinf(y).any() and not np.isinf(x).any():
      raise ValueError(f'tensor {name!r} has values beyond the range of {t.name} '
                       f'(max |x| = {float(np.abs(x).max()):.4g}); pass --dtype=float32')
    if dtype == 'auto' and not np.array_equal(y.astype(x.dtype), x, equal_nan=True):
      raise ValueError(f'tensor {name!r}: its {x.dtype.name} values do not fit {t.name} (its dtype '
                       f'at import) exactly, e.g. after training; pass --dtype={t.name} to round '
                       'or --dtype=float32 to keep them')
    return y
  return cast, target


def export_hf(src: str, out: str, family: str, *, dtype: str, max_shard_size: str,
              step: int | None, log=print) -> None:
  from launch.hf_files import parse_size, write_safetensors
  from launch.workdir import load_config
  from model import hf_weights
  from model.config import ModelConfig
  from train import checkpoint_stream as cs
  from train.tokenizer import load_workdir_tokenizer
  from train.hf_tokenizer import HFTokenizer

  shard_bytes = parse_size(max_shard_size)
  cfg = load_config(src)
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  reader = cs.LeafReader(src, step)
  cs.check_model(reader.record, model_cfg, f'checkpoint {reader.directory}')

  plan = hf_weights.hf_plan(model_cfg)
  for leaf in hf_weights.leaves(model_cfg):
    got = reader.shape(('params',) + leaf.path)
    if got != leaf.shape:
      raise ValueError(f'checkpoint leaf params.{leaf.name} has shape {got}, expected '
                       f'{leaf.shape} from {src}/config.json')
  recorded = {}
  conv = os.path.join(src, 'hf', 'conversion.json')
  if os.path.isfile(conv):
    with open(conv) as f:
      recorded = json.load(f).get('dtypes', {})
  default = reader.dtype(('params', 'embedder', 'embedding'))
  cast, target = make_cast(dtype, recorded, default)
  tensors = [(name, shape, target(name)) for name, shape, _, _ in plan]

  # Tokenizer: a converted checkpoint's own files go back; palmax's tokenizer has no HF form.
  tok = None
  try:
    tok = load_workdir_tokenizer(src)
  except ValueError:
    log(f'note: {src} has no tokenizer; exporting weights and config only')
  extra = {}
  if isinstance(tok, HFTokenizer):
    for name, data in tok.hf_files().items():
      with open(os.path.join(out, name), 'wb') as f:
        f.write(data)
    extra = {f'{k}_token_id': v for k, v in tok.ids.items() if k != 'unk' and v is not None}
  elif tok is not None:
    log('note: the workdir uses palmax\'s own tokenizer (newline/indent symbols), which HF '
        'tokenizers cannot reproduce; not exported')
  names = [t[2].name for t in tensors]
  main_dtype = max(set(names), key=names.count)
  extra.update(torch_dtype=main_dtype)
  hf_cfg = _hf_config(src, model_cfg, family, extra, log)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  if os.path.isfile(os.path.join(src, 'hf', 'generation_config.json')):
    shutil.copyfile(os.path.join(src, 'hf', 'generation_config.json'),
                    os.path.join(out, 'generation_config.json'))

  def read(leaf, a, b):
    return reader.read(('params',) + leaf.path, a, b, leaf.axis)

  row_bytes = model_cfg.d_model * 4
  values = hf_weights.iter_hf(model_cfg, read, rows_per_block=max(1, cs.BLOCK_BYTES // row_bytes))
  total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in tensors)
  log(f'{family}: {len(tensors)} tensors, {total / 1e9:.3f} GB ({main_dtype}) -> {out}')
  write_safetensors(out, tensors, values, shard_bytes, cast, log=log)
