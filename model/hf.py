"""Hugging Face transformers interop: configs of Llama, Mistral, Mixtral and Gemma 1/2/3.

`config_from_hf(hf_config)` maps a `transformers` config (or its `to_dict()`, or a parsed
config.json) to a ModelConfig; `config_to_hf(cfg, family)` is its inverse and refuses a config the
family cannot express, naming the field. The weights live in `model/hf_weights.py`
(`params_from_hf` / `params_to_hf`, re-exported here). Nothing here imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from model.config import MoEConfig, ModelConfig

# CLI family -> HF model_type, architecture class. `gemma3` is the text decoder (Gemma3ForCausalLM);
# multimodal `gemma3` checkpoints import their language model.
FAMILIES = {
    'llama': ('llama', 'LlamaForCausalLM'),
    'mistral': ('mistral', 'MistralForCausalLM'),
    'mixtral': ('mixtral', 'MixtralForCausalLM'),
    'gemma': ('gemma', 'GemmaForCausalLM'),
    'gemma2': ('gemma2', 'Gemma2ForCausalLM'),
    'gemma3': ('gemma3_text', 'Gemma3ForCausalLM'),
}
# Multimodal Gemma 3 checkpoints say 'gemma3'; their text decoder is what gets imported.
SUPPORTED_MODEL_TYPES = tuple(t for t, _ in FAMILIES.values()) + ('gemma3',)
_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu_tanh')
# ModelConfig / MoEConfig fields that are palmax run-time choices, not architecture: HF has no
# value for them, so they never block an export and `config_from_hf` takes them as overrides.
RUNTIME_FIELDS = ('remat', 'dtype', 'param_dtype', 'attention_impl')
MOE_RUNTIME_FIELDS = ('dispatch', 'capacity_factor', 'capacity_group', 'aux_loss_coef',
                      'router_z_loss_coef', 'bias_update_rate', 'router_init_scale')


def family_of(hf_config) -> str:
  """The CLI family name of a HF config (ValueError for an unsupported model_type)."""
  c = _as_dict(hf_config)
  model_type = 'gemma3_text' if c.get('model_type') == 'gemma3' else c.get('model_type')
  for family, (mt, _) in FAMILIES.items():
    if mt == model_type:
      return family
  raise ValueError(f'unsupported HF model_type {c.get("model_type")!r}; supported: '
                   f'{SUPPORTED_MODEL_TYPES}')


def _as_dict(hf_config) -> dict:
  return dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())


def _get(c: Mapping[str, Any], key: str, default=None):
  v = c.get(key, default)
  return default if v is None else v


def _rope(c: Mapping[str, Any]) -> dict:
  """{'global': params, 'local': params} from rope_parameters (transformers 5) or
  rope_theta/rope_scaling (transformers 4)."""
  rp = c.get('rope_parameters')
  if rp and isinstance(rp, Mapping) and 'full_attention' in rp:
    glob = dict(rp['full_attention'])
    loc = dict(rp.get('sliding_attention') or glob)
  elif rp:
    glob, loc = dict(rp), dict(rp)
  else:
    glob = dict(c.get('rope_scaling') or {})
    glob.setdefault('rope_theta', _get(c, 'rope_theta', 10_000.0))
    loc = dict(glob)
    if c.get('rope_local_base_freq') is not None:
      loc = {'rope_type': 'default', 'rope_theta': c['rope_local_base_freq']}
  for d in (glob, loc):
    d.setdefault('rope_type', d.get('type', 'default'))
  return {'global': glob, 'local': loc}


def _rope_fields(rope: dict, has_local: bool) -> dict:
  """palmax RoPE fields. Scaling applies to global layers; local layers must be unscaled
  (Gemma 3: linear factor 8 on global layers only, plain base on local ones)."""
  glob, loc = rope['global'], rope['local']
  out = {'rope_base': float(glob['rope_theta'])}
  rtype = glob['rope_type']
  if has_local and loc['rope_type'] != 'default' and loc != glob:
    raise ValueError(f"rope_parameters: local layers use rope_type={loc['rope_type']!r}; palmax "
                     'scales RoPE on global layers only')
  if rtype == 'llama3':
    out.update(rope_scaling='llama3', rope_scaling_factor=float(glob['factor']),
               rope_low_freq_factor=float(glob['low_freq_factor']),
               rope_high_freq_factor=float(glob['high_freq_factor']),
               rope_original_max_len=int(glob['original_max_position_embeddings']))
  elif rtype == 'linear':
    out.update(rope_scaling='linear', rope_scaling_factor=float(glob['factor']))
  elif rtype != 'default':
    raise ValueError(f'rope_parameters.rope_type={rtype!r} is not supported by palmax '
                     "(only 'default', 'linear' and 'llama3')")
  if has_local and float(loc['rope_theta']) != out['rope_base']:
    out['rope_base_local'] = float(loc['rope_theta'])
  return out


def _pattern(layer_types) -> str:
  """Shortest repeating 'L'/'G' pattern for HF layer_types."""
  s = ''
  for t in layer_types:
    if t == 'sliding_attention':
      s += 'L'
    elif t == 'full_attention':
      s += 'G'
    else:
      raise ValueError(f'layer_types contains {t!r}; palmax supports sliding_attention and '
                       'full_attention only')
  for p in range(1, len(s) + 1):
    if all(s[i] == s[i % p] for i in range(len(s))):
      return s[:p]
  return s


def _moe_from_hf(c: Mapping[str, Any]) -> MoEConfig:
  """Mixtral's sparse FFN (Jiang et al. 2024, §2.1): top-k of E experts, softmax over the kept
  logits, on every layer. HF's balance loss sums f over the k choices, palmax's averages them, so
  the same loss needs coef * k here."""
  k = int(c['num_experts_per_tok'])
  return MoEConfig(num_experts=int(c['num_local_experts']), top_k=k,
                   expert_mlp_dim=int(c['intermediate_size']), gating='topk_softmax',
                   dispatch='dropless', aux_loss_coef=float(_get(c, 'router_aux_loss_coef', 0.0)) * k,
                   router_z_loss_coef=0.0)


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """A ModelConfig equivalent to a HF Llama/Mistral/Mixtral/Gemma/Gemma 2/Gemma 3 text config.

  `overrides` (e.g. dtype, remat, max_seq_len) are applied last. Raises ValueError naming the
  model_type or the field palmax cannot represent.
  """
  c = _as_dict(hf_config)
  model_type = c.get('model_type')
  if model_type == 'gemma3':
    text = c.get('text_config')
    if text is None:
      raise ValueError('gemma3 config has no text_config')
    c = _as_dict(text)
    model_type = 'gemma3_text'
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f'unsupported HF model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}')
  gemma = model_type.startswith('gemma')

  for flag in ('attention_bias', 'mlp_bias', 'use_bidirectional_attention'):
    if c.get(flag):
      raise ValueError(f'{flag}={c[flag]!r} is not supported by palmax')

  d, n = int(c['hidden_size']), int(c['num_attention_heads'])
  head_dim = int(c.get('head_dim') or d // n)
  act = c.get('hidden_activation') or c.get('hidden_act') or ('gelu_pytorch_tanh' if gemma else 'silu')
  if act == 'silu':
    activation = 'swiglu'
  elif act in _GELU_TANH:
    activation = 'geglu'
  else:
    raise ValueError(f'hidden_act/hidden_activation={act!r} is not supported by palmax '
                     '(silu -> swiglu, gelu_pytorch_tanh -> geglu)')

  num_layers = int(c['num_hidden_layers'])
  layer_pattern, sliding_window = 'G', 0
  layer_types = c.get('layer_types')
  if model_type in ('gemma2', 'gemma3_text'):
    if not layer_types:
      period = 2 if model_type == 'gemma2' else int(_get(c, 'sliding_window_pattern', 6))
      layer_types = ['sliding_attention' if (i + 1) % period else 'full_attention'
                     for i in range(num_layers)]
  elif model_type in ('mistral', 'mixtral') and not layer_types and c.get('sliding_window'):
    layer_types = ['sliding_attention'] * num_layers
  if layer_types:
    if len(layer_types) != num_layers:
      raise ValueError(f'layer_types has {len(layer_types)} entries for {num_layers} layers')
    layer_pattern = _pattern(layer_types)
  if 'L' in layer_pattern:
    sliding_window = int(c.get('sliding_window') or 0)
    if sliding_window <= 0:
      raise ValueError('sliding_window must be set for a model with sliding_attention layers')

  fields = dict(
      vocab_size=int(c['vocab_size']), d_model=d, num_layers=num_layers, num_heads=n,
      num_kv_heads=int(c.get('num_key_value_heads') or n), head_dim=head_dim,
      mlp_dim=int(c['intermediate_size']), activation=activation,
      tie_embeddings=bool(c.get('tie_word_embeddings', gemma)),
      scale_embeddings=gemma, norm_offset_one=gemma, norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      post_norms=model_type in ('gemma2', 'gemma3_text'), qk_norm=model_type == 'gemma3_text',
      layer_pattern=layer_pattern, sliding_window=sliding_window,
      max_seq_len=int(c.get('max_position_embeddings') or 2048))
  fields.update(_rope_fields(_rope(c), 'L' in layer_pattern))
  if model_type in ('gemma2', 'gemma3_text'):
    fields['logit_softcap'] = float(_get(c, 'final_logit_softcapping', 0.0))
    fields['attn_softcap'] = float(_get(c, 'attn_logit_softcapping', 0.0))
    qs = c.get('query_pre_attn_scalar')
    if qs is not None and qs != head_dim:
      if float(qs) != int(qs):
        raise ValueError(f'query_pre_attn_scalar={qs!r} must be an integer for palmax '
                         '(query_scale_dim)')
      fields['query_scale_dim'] = int(qs)
  if model_type == 'mixtral':
    fields['moe'] = _moe_from_hf(c)
  moe_overrides = overrides.pop('moe', None)
  fields.update(overrides)
  if moe_overrides and fields.get('moe') is not None:
    fields['moe'] = dataclasses.replace(fields['moe'], **moe_overrides)
  cfg = ModelConfig(**fields)
  cfg.validate()
  return cfg


def runtime_overrides(cfg: ModelConfig) -> dict:
  """cfg's run-time fields as `config_from_hf` overrides (so a comparison ignores them)."""
  out: dict[str, Any] = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
  if cfg.moe is not None:
    out['moe'] = {k: getattr(cfg.moe, k) for k in MOE_RUNTIME_FIELDS}
  return out


def config_to_hf(cfg: ModelConfig, family: str, **extra) -> dict[str, Any]:
  """A HF config.json dict of `family` equivalent to `cfg` (inverse of `config_from_hf`).

  Raises ValueError naming every ModelConfig field the family cannot express (e.g. a parallel
  block, or logit soft-capping for Llama). `extra` adds keys such as bos/eos token ids.
  RoPE is written in the transformers 4 form (rope_theta / rope_scaling), which 5.x reads too.
  """
  if family not in FAMILIES:
    raise ValueError(f'unknown family {family!r}; expected one of {sorted(FAMILIES)}')
  if family == 'mixtral' and cfg.moe is None:
    raise ValueError('config.model.moe is None: a dense model has no HF mixtral equivalent '
                     '(use --family=mistral)')
  if cfg.block != 'serial':
    raise ValueError(f'config.model.block={cfg.block!r} has no HF {family} equivalent (serial only)')
  model_type, arch = FAMILIES[family]
  gemma = family.startswith('gemma')
  kinds = cfg.layer_kinds()
  out: dict[str, Any] = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_base, attention_bias=False,
      attention_dropout=0.0, initializer_range=0.02, use_cache=True)
  act = {'swiglu': 'silu', 'geglu': 'gelu_pytorch_tanh'}.get(cfg.activation, cfg.activation)
  out['hidden_activation' if gemma else 'hidden_act'] = act
  if gemma:
    out['hidden_act'] = act
  if cfg.rope_scaling == 'llama3':
    out['rope_scaling'] = dict(
        rope_type='llama3', factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_scaling == 'linear':
    out['rope_scaling'] = dict(rope_type='linear', factor=cfg.rope_scaling_factor)
  if family in ('mistral', 'mixtral'):
    out['sliding_window'] = cfg.sliding_window if 'L' in kinds else None
  if family in ('gemma2', 'gemma3'):
    out.update(sliding_window=cfg.sliding_window,
               layer_types=['sliding_attention' if k == 'L' else 'full_attention' for k in kinds],
               query_pre_attn_scalar=cfg.query_scale_dim or cfg.head_dim,
               final_logit_softcapping=cfg.logit_softcap or None,
               attn_logit_softcapping=cfg.attn_softcap or None)
    if family == 'gemma3':
      out['sliding_window_pattern'] = len(cfg.layer_pattern)
      out['rope_local_base_freq'] = cfg.rope_base_local or cfg.rope_base
  if family == 'mixtral' and cfg.moe is not None:
    m = cfg.moe
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
               intermediate_size=m.expert_mlp_dim, router_aux_loss_coef=m.aux_loss_coef / m.top_k,
               router_jitter_noise=0.0, output_router_logits=False)
  out.update(extra)
  _check_round_trip(cfg, out, family)
  return out


def _check_round_trip(cfg: ModelConfig, out: dict, family: str) -> None:
  """`config_from_hf(out)` must give `cfg` back; otherwise name what the family cannot hold."""
  try:
    back = config_from_hf(out, **runtime_overrides(cfg))
  except (ValueError, TypeError) as e:
    raise ValueError(f'config.model cannot be written as a HF {family} config: {e}') from None
  have, want = back.to_dict(), cfg.to_dict()
  diffs = []
  for key in sorted(want):
    if key == 'moe' and want['moe'] is not None and have['moe'] is not None:
      diffs += [f'moe.{k}={want["moe"][k]!r}' for k in sorted(want['moe'])
                if want['moe'][k] != have['moe'][k]]
    elif have[key] != want[key]:
      diffs.append(f'{key}={want[key]!r}')
  if diffs:
    raise ValueError(f'config.model has no HF {family} equivalent for: {", ".join(diffs)} '
                     f'(a {family} checkpoint would have {", ".join(_names(diffs, have))})')


def _names(diffs, have) -> list[str]:
  out = []
  for d in diffs:
    key = d.split('=')[0]
    if key.startswith('moe.'):
      out.append(f'{key}={(have["moe"] or {}).get(key[4:])!r}')
    else:
      out.append(f'{key}={have[key]!r}')
  return out


# Weights: re-exported so `hf.params_from_hf` keeps working.
from model.hf_weights import params_from_hf, params_to_hf  # noqa: E402,F401
