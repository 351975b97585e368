"""LoRA adapters in the PEFT library's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT (HF `nn.Linear`, weight [out, in]) stores per layer, under
`base_model.model.model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.`:
  lora_A.weight [r, in_features], lora_B.weight [out_features, r],   ΔW_hf = scale · B·A
with scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (LoRA: Hu et al. 2021;
rsLoRA: Kalajdzievski 2023), the same as `model.peft.LoraConfig.scale`.

palmax keeps A [R, in..., r] and B [R, r, out...] along the base weight's axes. The HF weight is
the palmax one with its output axes moved first and both groups flattened in palmax order
(model/hf_weights.py: q_proj [N*H, D] = w_q [D, N, H] -> (N, H, D); o_proj [D, N*H] = w_o
[N, H, D] -> (D, N, H)), so per layer A_hf = A.reshape(in, r).T and B_hf = B.reshape(r, out).T.
Layer i of HF is repeat r of stack{j}/block{p} (`ModelConfig.layer_slots()`). Dense
(Llama-style) blocks only: MoE expert weights have no LoRA here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from model import hf_weights
from model.peft import lora as peft_lib
from model.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'
_KEY = re.compile(r'model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight')


def _hf_modules(model_cfg: ModelConfig) -> dict[str, str]:
  """Block-relative palmax path -> HF module under the layer ('attn/w_q' -> 'self_attn.q_proj'),
  from hf_weights' own table, so adapter and base names cannot disagree."""
  out = {}
  for path, part in hf_weights._block_parts(model_cfg, moe=False):
    name, kind = hf_weights._PARTS[part]
    if kind in ('q', 'kv', 'o', 'in', 'out'):
      out['/'.join(path)] = name[:-len('.weight')]
  return out


def to_hf(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One layer: A [in..., r], B [r, out...] -> (lora_A [r, in], lora_B [out, r])."""
  r = a.shape[-1]
  return (np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T))


def from_hf(a_hf: np.ndarray, b_hf: np.ndarray, in_shape, out_shape):
  """Inverse of `to_hf`: (lora_A [r, in], lora_B [out, r]) -> (A [in..., r], B [r, out...])."""
  r = a_hf.shape[0]
  return a_hf.T.reshape(tuple(in_shape) + (r,)), b_hf.T.reshape((r,) + tuple(out_shape))


def _layers(model_cfg: ModelConfig, stack_block: str) -> list[tuple[int, int]]:
  """(HF layer, repeat) of every layer stacked at 'stack{j}/block{p}'."""
  return [(i, r) for i, (s, b, r) in enumerate(model_cfg.layer_slots())
          if f'{s}/{b}' == stack_block]


def _site_name(path: str, model_cfg: ModelConfig) -> tuple[str, str]:
  """'stack0/block0/attn/w_q' -> ('stack0/block0', 'self_attn.q_proj'); ValueError otherwise."""
  sb, rel = path.rsplit('/', 2)[0], '/'.join(path.split('/')[2:])
  j, p = int(sb.split('/')[0][5:]), int(sb.split('/')[1][5:])
  if model_cfg.layer_groups()[j][1][p] == 'M' and rel.startswith('mlp/'):
    raise ValueError(f'{path}: MoE expert weights have no PEFT LoRA form; target dense weights')
  mods = _hf_modules(model_cfg)
  if rel not in mods:
    raise ValueError(f'{path}: no HF module for LoRA (expected one of {sorted(mods)})')
  return sb, mods[rel]


def export_peft(model, lora_cfg: peft_lib.LoraConfig, model_cfg: ModelConfig, directory: str,
                base_model_name_or_path: str = '') -> list[str]:
  """Writes `model`'s adapters (unmerged) as a PEFT LoRA adapter in `directory`; returns the
  files. `peft.PeftModel.from_pretrained(<exported base>, directory)` loads it."""
  from safetensors.numpy import save_file
  lora_cfg.validate()
  hf_weights.leaves(model_cfg)   # Refuses configs with no HF form (e.g. parallel blocks).
  found = peft_lib.lora_sites(model)
  if not found:
    raise ValueError('export_peft: the model has no LoRA adapters (call apply_lora first)')
  tensors, modules = {}, set()
  for path, lora in found.items():
    sb, mod = _site_name(path, model_cfg)
    a, b = np.asarray(lora.lora_a[...]), np.asarray(lora.lora_b[...])
    if a.shape[-1] != lora_cfg.rank or lora.scale != lora_cfg.scale:
      raise ValueError(f'export_peft: {path} has rank {a.shape[-1]} and scale {lora.scale}; '
                       f'lora_cfg says rank {lora_cfg.rank}, scale {lora_cfg.scale}')
    modules.add(mod.split('.')[-1])
    for i, r in _layers(model_cfg, sb):
      a_hf, b_hf = to_hf(a[r], b[r])
      name = f'{_PREFIX}model.layers.{i}.{mod}'
      tensors[f'{name}.lora_A.weight'], tensors[f'{name}.lora_B.weight'] = a_hf, b_hf
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lora_cfg.rank,
      'lora_alpha': lora_cfg.alpha, 'lora_dropout': lora_cfg.dropout,
      'target_modules': sorted(modules), 'use_rslora': lora_cfg.rslora, 'bias': 'none',
      'fan_in_fan_out': False, 'base_model_name_or_path': base_model_name_or_path or None,
      'inference_mode': True, 'init_lora_weights': True, 'modules_to_save': None,
      'layers_to_transform': None, 'rank_pattern': {}, 'alpha_pattern': {}, 'use_dora': False}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(dict(sorted(tensors.items())), os.path.join(directory, WEIGHTS_FILE),
            metadata={'format': 'pt'})
  return [CONFIG_FILE, WEIGHTS_FILE]


def _read_config(path: str) -> peft_lib.LoraConfig:
  """adapter_config.json -> a LoraConfig (targets filled in later); ValueError naming the field."""
  try:
    with open(path) as f:
      c = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read a PEFT adapter config ({e})') from None
  if not isinstance(c, dict) or c.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type is {c.get("peft_type") if isinstance(c, dict) else c!r}, '
                     "expected 'LORA'")
  unsupported = {'bias': 'none', 'fan_in_fan_out': False, 'use_dora': False, 'lora_bias': False,
                 'rank_pattern': {}, 'alpha_pattern': {}, 'modules_to_save': None,
                 'layers_to_transform': None, 'layer_replication': None,
                 'target_parameters': None}
  for key, want in unsupported.items():
    got = c.get(key, want)
    if got != want and not (want is None and got in ([], {})):
      raise ValueError(f'{path}: {key}={got!r} is not supported; expected {want!r}')
  cfg = peft_lib.LoraConfig(rank=c.get('r'), alpha=c.get('lora_alpha'),
                            dropout=c.get('lora_dropout', 0.0) or 0.0,
                            rslora=bool(c.get('use_rslora', False)))
  try:
    cfg.validate()
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  return cfg


def import_peft(model, directory: str, model_cfg: ModelConfig) -> peft_lib.LoraConfig:
  """Reads a PEFT LoRA adapter from `directory`, applies LoRA surgery to `model` (a plain
  Decoder of the adapter's base) and loads the tensors; returns the LoraConfig it used. Every
  layer of each targeted module must be present. ValueError naming the file and tensor on bad
  input, before the model is changed."""
  from safetensors.numpy import load_file
  cfg = _read_config(os.path.join(directory, CONFIG_FILE))
  path = os.path.join(directory, WEIGHTS_FILE)
  try:
    raw = load_file(path)
  except Exception as e:   # safetensors raises its own error types for a bad header.
    raise ValueError(f'{path}: cannot read safetensors ({e})') from None
  tensors = {}
  for key, value in raw.items():
    name = hf_weights.normalise_key(key[len(_PREFIX):] if key.startswith(_PREFIX) else key)
    m = _KEY.fullmatch(name)
    if m is None:
      raise ValueError(f'{path}: tensor {key!r} is not a LoRA A/B weight of a decoder layer')
    tensors[(int(m.group(1)), m.group(2), m.group(3))] = (key, value)
  by_hf = {v: k for k, v in _hf_modules(model_cfg).items()}
  mods = sorted({mod for _, mod, _ in tensors})
  for mod in mods:
    if mod not in by_hf:
      raise ValueError(f'{path}: LoRA on module {mod!r} is not supported; expected one of '
                       f'{sorted(by_hf)}')
  if not mods:
    raise ValueError(f'{path}: holds no LoRA tensors')
  cfg = dataclasses.replace(cfg, targets='|'.join(re.escape(by_hf[m]) for m in mods))
  tree, used = {}, set()
  for site_path, _, _, base in peft_lib.targeted(model, cfg):
    sb, mod = _site_name(site_path, model_cfg)
    lay = peft_lib.layout(base)
    in_shape, out_shape = lay.in_shape(base.shape), lay.out_shape(base.shape)
    want = {'A': (cfg.rank, math.prod(in_shape)), 'B': (math.prod(out_shape), cfg.rank)}
    slabs = {'A': [], 'B': []}
    for i, _ in _layers(model_cfg, sb):
      for ab in 'AB':
        if (i, mod, ab) not in tensors:
          raise ValueError(f'{path}: missing tensor '
                           f'{_PREFIX}model.layers.{i}.{mod}.lora_{ab}.weight')
        key, value = tensors[(i, mod, ab)]
        if tuple(value.shape) != want[ab]:
          raise ValueError(f'{path}: tensor {key!r} has shape {tuple(value.shape)}, expected '
                           f'{want[ab]}')
        used.add((i, mod, ab))
      a, b = from_hf(tensors[(i, mod, 'A')][1], tensors[(i, mod, 'B')][1], in_shape, out_shape)
      slabs['A'].append(a)
      slabs['B'].append(b)
    node = tree
    for k in site_path.split('/'):
      node = node.setdefault(k, {})
    node['lora_a'], node['lora_b'] = np.stack(slabs['A']), np.stack(slabs['B'])
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f'{path}: tensor {tensors[extra[0]][0]!r} matches no layer of this model '
                     f'({model_cfg.num_layers} layers)')
  peft_lib.apply_lora(model, cfg)
  peft_lib.load_lora_params(model, tree)
  return cfg
