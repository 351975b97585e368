"""Hugging Face transformers interop: configs and weights of Llama, Mistral and Gemma 1/2/3.

`config_from_hf(hf_config)` maps a `transformers` config (or its `to_dict()`) to a ModelConfig;
`params_from_hf(state_dict, cfg)` turns a HF state dict into palmax's pure parameter dict
(per-layer tensors stacked on a leading layer axis) and `params_to_hf` is its exact inverse.
Nothing here imports torch or transformers; torch tensors are accepted and converted.

HF layouts (PyTorch `nn.Linear` weights are [out, in]):
  q_proj [N*H, D] -> w_q [D, N, H];  k_proj/v_proj [K*H, D] -> w_k/w_v [D, K, H]
  o_proj [D, N*H] -> w_o [N, H, D];  gate/up_proj [F, D] -> [D, F];  down_proj [D, F] -> [F, D]
  lm_head [V, D] -> unembedding [D, V]
Both use the half-split ("rotate_half") RoPE layout, so no q/k permutation is needed.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'gemma', 'gemma2', 'gemma3_text', 'gemma3')
_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu_tanh')


def _get(c: Mapping[str, Any], key: str, default=None):
  v = c.get(key, default)
  return default if v is None else v


def _rope(c: Mapping[str, Any], model_type: str) -> dict:
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


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """A ModelConfig equivalent to a HF Llama/Mistral/Gemma/Gemma 2/Gemma 3 text config.

  `overrides` (e.g. dtype, remat, max_seq_len) are applied last. Raises ValueError naming the
  model_type or the field palmax cannot represent.
  """
  c = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
  model_type = c.get('model_type')
  if model_type == 'gemma3':
    text = c.get('text_config')
    if text is None:
      raise ValueError('gemma3 config has no text_config')
    c = dict(text if isinstance(text, Mapping) else text.to_dict())
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
      if model_type == 'gemma2':
        layer_types = ['sliding_attention' if (i + 1) % 2 else 'full_attention'
                       for i in range(num_layers)]
      else:
        period = int(_get(c, 'sliding_window_pattern', 6))
        layer_types = ['sliding_attention' if (i + 1) % period else 'full_attention'
                       for i in range(num_layers)]
  elif model_type == 'mistral' and not layer_types and c.get('sliding_window'):
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
  fields.update(_rope_fields(_rope(c, model_type), 'L' in layer_pattern))
  if model_type in ('gemma2', 'gemma3_text'):
    fields['logit_softcap'] = float(_get(c, 'final_logit_softcapping', 0.0))
    fields['attn_softcap'] = float(_get(c, 'attn_logit_softcapping', 0.0))
    qs = c.get('query_pre_attn_scalar')
    if qs is not None and qs != head_dim:
      if float(qs) != int(qs):
        raise ValueError(f'query_pre_attn_scalar={qs!r} must be an integer for palmax '
                         '(query_scale_dim)')
      fields['query_scale_dim'] = int(qs)
  fields.update(overrides)
  cfg = ModelConfig(**fields)
  cfg.validate()
  return cfg


# ---- Weights ---------------------------------------------------------------------------------

def _layer_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str]]:
  """(palmax path under 'stack{j}.block{p}', HF name under 'model.layers.{i}.') for every per-layer tensor."""
  m = [(('attn', 'w_q'), 'self_attn.q_proj.weight'), (('attn', 'w_k'), 'self_attn.k_proj.weight'),
       (('attn', 'w_v'), 'self_attn.v_proj.weight'), (('attn', 'w_o'), 'self_attn.o_proj.weight'),
       (('mlp', 'w_gate'), 'mlp.gate_proj.weight'), (('mlp', 'w_down'), 'mlp.down_proj.weight'),
       (('attn_norm', 'scale'), 'input_layernorm.weight')]
  if cfg.gated:
    m.append((('mlp', 'w_up'), 'mlp.up_proj.weight'))
  if cfg.block == 'parallel':
    raise ValueError('block=parallel has no HF Llama/Gemma equivalent')
  if cfg.post_norms:
    m += [(('mlp_norm', 'scale'), 'pre_feedforward_layernorm.weight'),
          (('post_attn_norm', 'scale'), 'post_attention_layernorm.weight'),
          (('post_mlp_norm', 'scale'), 'post_feedforward_layernorm.weight')]
  else:
    m.append((('mlp_norm', 'scale'), 'post_attention_layernorm.weight'))
  if cfg.qk_norm:
    m += [(('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight'),
          (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight')]
  return m


def _hf_shape(path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return {'w_q': (n * h, d), 'w_k': (k * h, d), 'w_v': (k * h, d), 'w_o': (d, n * h),
          'w_gate': (f, d), 'w_up': (f, d), 'w_down': (d, f)}.get(
              path[-2] if path[-1] == 'scale' else path[-1],
              (h,) if path[-2] in ('q_norm', 'k_norm') else (d,))


def _from_hf_layer(path, w, cfg):
  """One HF per-layer tensor -> palmax layout."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  name = path[-1]
  if name == 'w_q':
    return w.reshape(n, h, d).transpose(2, 0, 1)
  if name in ('w_k', 'w_v'):
    return w.reshape(k, h, d).transpose(2, 0, 1)
  if name == 'w_o':
    return w.reshape(d, n, h).transpose(1, 2, 0)
  if name in ('w_gate', 'w_up', 'w_down'):
    return w.T
  return w


def _to_hf_layer(path, w, cfg):
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  name = path[-1]
  if name == 'w_q':
    return w.transpose(1, 2, 0).reshape(n * h, d)
  if name in ('w_k', 'w_v'):
    return w.transpose(1, 2, 0).reshape(k * h, d)
  if name == 'w_o':
    return w.transpose(2, 0, 1).reshape(d, n * h)
  if name in ('w_gate', 'w_up', 'w_down'):
    return w.T
  return w


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):  # torch.Tensor, without importing torch.
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      import ml_dtypes
      return x.view(dtype=__import__('torch').int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Accepts multimodal Gemma 3 prefixes (model.language_model.*, language_model.*)."""
  out = {}
  for key, v in state_dict.items():
    for old, new in (('model.language_model.', 'model.'), ('language_model.model.', 'model.'),
                     ('language_model.lm_head.', 'lm_head.')):
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = v
  return out


def params_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """HF state dict (numpy arrays or torch tensors) -> palmax pure parameter dict (numpy).

  Raises ValueError naming a missing tensor, or a tensor with the wrong shape (got and expected).
  Tensors keep their dtype; extra tensors (e.g. rotary buffers, vision towers) are ignored.
  """
  sd = _normalise_keys(state_dict)

  def take(key, shape):
    if key not in sd:
      raise ValueError(f'HF state dict is missing tensor {key!r}')
    w = _to_numpy(sd[key])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f'HF tensor {key!r} has shape {tuple(w.shape)}, expected {tuple(shape)}')
    return w

  v, d = cfg.vocab_size, cfg.d_model
  params: dict = {'embedder': {'embedding': take('model.embed_tokens.weight', (v, d))},
                  'final_norm': {'scale': take('model.norm.weight', (d,))}}
  if not cfg.tie_embeddings:
    params['embedder']['unembedding'] = take('lm_head.weight', (v, d)).T
  for (stack, block), layers in _blocks(cfg).items():
    for path, hf_name in _layer_map(cfg):
      shape = _hf_shape(path, cfg)
      stacked = np.stack([_from_hf_layer(path, take(f'model.layers.{i}.{hf_name}', shape), cfg)
                          for i in layers])
      node = params.setdefault(stack, {}).setdefault(block, {})
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = stacked
  return params


def _blocks(cfg: ModelConfig) -> dict[tuple[str, str], list[int]]:
  """(stack, block) -> the HF layer indices stacked there, in repeat order."""
  out: dict[tuple[str, str], list[int]] = {}
  for i, (stack, block, _) in enumerate(cfg.layer_slots()):
    out.setdefault((stack, block), []).append(i)
  return out


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig,
                 include_tied_lm_head: bool = True) -> dict[str, np.ndarray]:
  """Palmax pure parameter dict -> HF state dict of numpy arrays (inverse of params_from_hf).

  With tied embeddings `lm_head.weight` is the embedding table (as in `model.state_dict()`);
  pass include_tied_lm_head=False to leave it out (as `save_pretrained` does).
  """
  def arr(x):
    return np.asarray(x)

  emb = arr(params['embedder']['embedding'])
  out = {'model.embed_tokens.weight': emb}
  for (stack, block), layers in _blocks(cfg).items():
    for path, hf_name in _layer_map(cfg):
      node = params[stack][block]
      for p in path:
        node = node[p]
      stacked = arr(node)
      for r, i in enumerate(layers):
        out[f'model.layers.{i}.{hf_name}'] = np.ascontiguousarray(
            _to_hf_layer(path, stacked[r], cfg))
  out['model.norm.weight'] = arr(params['final_norm']['scale'])
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = np.ascontiguousarray(arr(params['embedder']['unembedding']).T)
  elif include_tied_lm_head:
    out['lm_head.weight'] = emb
  return out
