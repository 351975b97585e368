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


class MergedReader:
  """A PEFT workdir's parameters merged into the base layout (model/peft/methods.py
  merge_peft: W + scale·A·B, a quantized base dequantized), held in memory, read like a
  checkpoint's leaves (`LeafReader.shape/dtype/read`)."""

  def __init__(self, src: str, step: int | None, log=print):
    from flax import nnx
    from launch.workdir import load_model
    from model.peft import methods as peft_lib
    from train import peft_run
    cfg, _, graphdef, params, _ = load_model(src, step)
    model = nnx.merge(graphdef, params)
    merged = peft_lib.merge_peft(model, peft_run.config_of(cfg))
    log(f'merged {len(merged)} PEFT weights of {src} into its base')
    self.params = nnx.state(model).to_pure_dict()

  def _leaf(self, path: tuple[str, ...]) -> np.ndarray:
    node = self.params
    for k in path[1:]:   # path[0] is 'params'.
      node = node[k]
    return np.asarray(node)

  def shape(self, path):
    return tuple(self._leaf(path).shape)

  def dtype(self, path):
    return self._leaf(path).dtype

  def read(self, path, start: int, stop: int, axis: int = 0) -> np.ndarray:
    return np.take(self._leaf(path), np.arange(start, stop), axis=axis)


def export_peft_adapter(src: str, out: str, family: str, *, step: int | None,
                        log=print) -> None:
  """A LoRA workdir's adapters (unmerged) in the Hugging Face PEFT library's format:
  `peft.PeftModel.from_pretrained(<its base exported with --to=hf>, out)` loads them."""
  from flax import nnx
  from launch.workdir import load_model
  from model.peft import hf as peft_hf
  from train import peft_run
  cfg, model_cfg, graphdef, params, _ = load_model(src, step)
  p = peft_run.config_of(cfg)
  if p.method != 'lora':
    raise ValueError(f'--to=peft exports LoRA adapters; {src} has config.peft.method={p.method!r}')
  base = (peft_run.read_base(src, step) or {}).get('workdir', '')
  files = peft_hf.export_peft(nnx.merge(graphdef, params), p.lora(), model_cfg, out, base)
  log(f'{family}: LoRA rank {p.lora_rank} adapters ({", ".join(files)}) -> {out}')


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
  from train import peft_run
  if peft_run.config_of(cfg).active:   # Adapters (+ a quantized base) merged into plain weights.
    reader = MergedReader(src, step, log)

  if model_cfg.heads:   # model/heads.py: not part of a causal LM checkpoint.
    log(f'note: the scalar head(s) {", ".join(model_cfg.heads)} are not exported: {out} holds '
        'the decoder as a causal LM')
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
