"""Hugging Face <-> palmax weights, one tensor (or one layer slab) at a time.

palmax keeps per-layer tensors stacked on a leading repeat axis under `stack{j}.block{p}`
(`ModelConfig.layer_slots()`); HF keeps one tensor per layer (`model.layers.{i}.*`), and for
Mixtral one per expert. `leaves(cfg)` describes every palmax leaf as a `Leaf`: where its blocks
come from, so a converter can build a leaf slab by slab and never hold the whole model
(`read_block`), and the inverse (`slab_to_hf`, `hf_plan`). `params_from_hf` / `params_to_hf` are
the whole-dict forms. Nothing here imports torch; torch tensors are accepted and converted.

HF layouts (PyTorch `nn.Linear` weights are [out, in]):
  q_proj [N*H, D] -> w_q [D, N, H];  k_proj/v_proj [K*H, D] -> w_k/w_v [D, K, H]
  o_proj [D, N*H] -> w_o [N, H, D];  gate/up_proj [F, D] -> [D, F];  down_proj [D, F] -> [F, D]
  lm_head [V, D] -> unembedding [D, V]
  Mixtral: block_sparse_moe.gate [E, D] -> router [D, E]; experts.{e}.w1/w3 [F, D] -> w_gate/w_up
  [E, D, F]; experts.{e}.w2 [D, F] -> w_down [E, F, D]. transformers 5 holds them fused in memory
  (mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F]); both are read, the
  per-expert (hub) form is written.
Both use the half-split ("rotate_half") RoPE layout, so no q/k permutation is needed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from model.config import ModelConfig

# part -> (HF name under 'model.layers.{i}.', kind). {e} is the expert index.
_PARTS = {
    'w_q': ('self_attn.q_proj.weight', 'q'), 'w_k': ('self_attn.k_proj.weight', 'kv'),
    'w_v': ('self_attn.v_proj.weight', 'kv'), 'w_o': ('self_attn.o_proj.weight', 'o'),
    'mlp.w_gate': ('mlp.gate_proj.weight', 'in'), 'mlp.w_up': ('mlp.up_proj.weight', 'in'),
    'mlp.w_down': ('mlp.down_proj.weight', 'out'),
    'attn_norm': ('input_layernorm.weight', 'norm'),
    'mlp_norm': ('post_attention_layernorm.weight', 'norm'),
    'mlp_norm_pre': ('pre_feedforward_layernorm.weight', 'norm'),
    'post_attn_norm': ('post_attention_layernorm.weight', 'norm'),
    'post_mlp_norm': ('post_feedforward_layernorm.weight', 'norm'),
    'q_norm': ('self_attn.q_norm.weight', 'head_norm'),
    'k_norm': ('self_attn.k_norm.weight', 'head_norm'),
    'moe.router': ('block_sparse_moe.gate.weight', 'router'),
    'moe.w_gate': ('block_sparse_moe.experts.{e}.w1.weight', 'experts_in'),
    'moe.w_up': ('block_sparse_moe.experts.{e}.w3.weight', 'experts_in'),
    'moe.w_down': ('block_sparse_moe.experts.{e}.w2.weight', 'experts_out'),
    'moe.router_bias': ('', 'zeros'),   # DeepSeek-style selection bias: Mixtral has none.
}


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One palmax parameter. Whole-tensor leaves name `hf_name` (palmax = HF, or HF.T with
  `transpose`); stacked leaves name the HF layer of each repeat and a `part` of `_PARTS`.
  Blocks stream along `axis`: HF rows for whole tensors, repeats for stacked leaves."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  hf_name: str = ''
  transpose: bool = False
  layers: tuple[int, ...] = ()
  part: str = ''

  @property
  def axis(self) -> int:
    return 1 if self.transpose else 0

  @property
  def name(self) -> str:
    return '.'.join(self.path)


def leaves(cfg: ModelConfig) -> list[Leaf]:
  """Every palmax parameter leaf of `cfg` with its HF source, in HF file order."""
  if cfg.block == 'parallel':
    raise ValueError('config.model.block=parallel has no HF Llama/Mistral/Gemma equivalent')
  v, d = cfg.vocab_size, cfg.d_model
  out = [Leaf(('embedder', 'embedding'), (v, d), 'model.embed_tokens.weight')]
  for (stack, block), layers in _blocks(cfg).items():
    moe = cfg.layer_groups()[int(stack[5:])][1][int(block[5:])] == 'M'
    for path, part in _block_parts(cfg, moe):
      shape = (len(layers),) + _palmax_shape(part, cfg)
      out.append(Leaf((stack, block) + path, shape, layers=tuple(layers), part=part))
  out.append(Leaf(('final_norm', 'scale'), (d,), 'model.norm.weight'))
  if not cfg.tie_embeddings:
    out.append(Leaf(('embedder', 'unembedding'), (d, v), 'lm_head.weight', transpose=True))
  return out


def _blocks(cfg: ModelConfig) -> dict[tuple[str, str], list[int]]:
  """(stack, block) -> the HF layer indices stacked there, in repeat order."""
  out: dict[tuple[str, str], list[int]] = {}
  for i, (stack, block, _) in enumerate(cfg.layer_slots()):
    out.setdefault((stack, block), []).append(i)
  return out


def _block_parts(cfg: ModelConfig, moe: bool) -> list[tuple[tuple[str, ...], str]]:
  """(palmax path under the block, part) for one block's tensors."""
  m = [(('attn', 'w_q'), 'w_q'), (('attn', 'w_k'), 'w_k'), (('attn', 'w_v'), 'w_v'),
       (('attn', 'w_o'), 'w_o')]
  if moe:
    m += [(('mlp', 'router'), 'moe.router'), (('mlp', 'router_bias'), 'moe.router_bias'),
          (('mlp', 'w_gate'), 'moe.w_gate')]
    m += [(('mlp', 'w_up'), 'moe.w_up')] if cfg.gated else []
    m += [(('mlp', 'w_down'), 'moe.w_down')]
  else:
    m += [(('mlp', 'w_gate'), 'mlp.w_gate')]
    m += [(('mlp', 'w_up'), 'mlp.w_up')] if cfg.gated else []
    m += [(('mlp', 'w_down'), 'mlp.w_down')]
  m.append((('attn_norm', 'scale'), 'attn_norm'))
  if cfg.post_norms:  # Gemma 2/3: HF's post_attention_layernorm is the attention *output* norm.
    m += [(('mlp_norm', 'scale'), 'mlp_norm_pre'), (('post_attn_norm', 'scale'), 'post_attn_norm'),
          (('post_mlp_norm', 'scale'), 'post_mlp_norm')]
  else:
    m.append((('mlp_norm', 'scale'), 'mlp_norm'))
  if cfg.qk_norm:
    m += [(('attn', 'q_norm', 'scale'), 'q_norm'), (('attn', 'k_norm', 'scale'), 'k_norm')]
  return m


def _palmax_shape(part: str, cfg: ModelConfig) -> tuple[int, ...]:
  """Shape of one repeat of a stacked leaf."""
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  kind = _PARTS[part][1]
  if kind in ('experts_in', 'experts_out', 'router', 'zeros'):
    e, fe = cfg.moe.num_experts, cfg.moe.expert_mlp_dim
    return {'experts_in': (e, d, fe), 'experts_out': (e, fe, d), 'router': (d, e),
            'zeros': (e,)}[kind]
  return {'q': (d, n, h), 'kv': (d, k, h), 'o': (n, h, d), 'in': (d, f), 'out': (f, d),
          'norm': (d,), 'head_norm': (h,)}[kind]


def hf_entries(leaf: Leaf, cfg: ModelConfig, layer: int | None = None) -> list[tuple[str, tuple]]:
  """(HF name, HF shape) of the tensors behind a whole leaf, or behind one layer of a stacked one."""
  if not leaf.layers:
    return [(leaf.hf_name, leaf.shape[::-1] if leaf.transpose else leaf.shape)]
  template, kind = _PARTS[leaf.part]
  prefix = f'model.layers.{layer}.'
  shape = leaf.shape[1:]
  if kind == 'zeros':
    return []
  if kind in ('experts_in', 'experts_out'):
    return [(prefix + template.format(e=e), shape[:0:-1]) for e in range(shape[0])]
  hf_shape = {'q': lambda s: (s[1] * s[2], s[0]), 'kv': lambda s: (s[1] * s[2], s[0]),
              'o': lambda s: (s[2], s[0] * s[1]), 'in': lambda s: s[::-1], 'out': lambda s: s[::-1],
              'router': lambda s: s[::-1], 'norm': tuple, 'head_norm': tuple}[kind](shape)
  return [(prefix + template, tuple(hf_shape))]


# ---- HF tensor sources -----------------------------------------------------------------------

def to_numpy(x) -> np.ndarray:
  """numpy view of a numpy array or torch tensor (bfloat16 via ml_dtypes), without torch import."""
  if hasattr(x, 'detach'):
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      import ml_dtypes
      return x.view(dtype=__import__('torch').int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


class DictSource:
  """The tensor-source interface (`in`, shape, dtype, rows) over an in-memory state dict.
  Accepts multimodal Gemma 3 prefixes (model.language_model.*, language_model.*)."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._sd = {normalise_key(k): v for k, v in state_dict.items()}

  def __contains__(self, name: str) -> bool:
    return name in self._sd

  def names(self) -> list[str]:
    return list(self._sd)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._sd[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return to_numpy(self._sd[name][:0] if self._sd[name].ndim else self._sd[name]).dtype

  def rows(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    return to_numpy(self._sd[name][start:stop] if self._sd[name].ndim else self._sd[name])


def normalise_key(key: str) -> str:
  for old, new in (('model.language_model.', 'model.'), ('language_model.model.', 'model.'),
                   ('language_model.lm_head.', 'lm_head.')):
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _layer_sources(leaf: Leaf, src, cfg: ModelConfig, layer: int):
  """Where one layer of a stacked leaf lives in `src`: ([(HF name, expected shape)], read) with
  read() -> this layer's tensors in hub form (one per `hf_entries`). Hub names are preferred;
  transformers-5 in-memory Mixtral names (mlp.gate, mlp.experts.gate_up_proj [E, 2F, D],
  mlp.experts.down_proj [E, D, F]) are the fallback."""
  entries = hf_entries(leaf, cfg, layer)
  if all(n in src for n, _ in entries) or not leaf.part.startswith('moe.'):
    return entries, lambda: [src.rows(n) for n, _ in entries]
  # router [D, E]; w_gate/w_up [E, D, F]; w_down [E, F, D]
  e, a, b = (leaf.shape[2], leaf.shape[1], 0) if leaf.part == 'moe.router' else leaf.shape[1:]
  hub = f'model.layers.{layer}.block_sparse_moe.'
  for p in (f'model.layers.{layer}.mlp.', hub):
    if leaf.part == 'moe.router' and p + 'gate.weight' in src:
      return [(p + 'gate.weight', (e, a))], lambda p=p: [src.rows(p + 'gate.weight')]
    if leaf.part == 'moe.w_down' and p + 'experts.down_proj' in src:
      return [(p + 'experts.down_proj', (e, b, a))], lambda p=p: list(src.rows(p + 'experts.down_proj'))
    if leaf.part in ('moe.w_gate', 'moe.w_up') and p + 'experts.gate_up_proj' in src:
      half = slice(None, b) if leaf.part == 'moe.w_gate' else slice(b, None)
      return ([(p + 'experts.gate_up_proj', (e, 2 * b, a))],
              lambda p=p: list(src.rows(p + 'experts.gate_up_proj')[:, half]))
  return entries, lambda: [src.rows(n) for n, _ in entries]


def check_source(src, cfg: ModelConfig) -> set[str]:
  """Raises ValueError naming the first missing or misshapen HF tensor; returns the names used."""
  used = set()
  for leaf in leaves(cfg):
    for layer in leaf.layers or (None,):
      entries = _layer_sources(leaf, src, cfg, layer)[0] if leaf.layers else hf_entries(leaf, cfg)
      for name, shape in entries:
        if name not in src:
          raise ValueError(f'HF state dict is missing tensor {name!r}')
        if tuple(src.shape(name)) != tuple(shape):
          raise ValueError(f'HF tensor {name!r} has shape {tuple(src.shape(name))}, '
                           f'expected {tuple(shape)}')
        used.add(name)
  return used


# ---- HF -> palmax ------------------------------------------------------------------------------

def _layer_from_hf(part: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One HF per-layer tensor -> one palmax repeat of `shape`."""
  kind = _PARTS[part][1]
  if kind in ('q', 'kv'):
    d, n, h = shape
    return w.reshape(n, h, d).transpose(2, 0, 1)
  if kind == 'o':
    n, h, d = shape
    return w.reshape(d, n, h).transpose(1, 2, 0)
  if kind in ('in', 'out', 'router'):
    return w.T
  return w


def read_block(leaf: Leaf, src, cfg: ModelConfig, start: int, stop: int) -> np.ndarray:
  """palmax block [start:stop] of `leaf` along `leaf.axis`, read from `src` (HF dtype kept)."""
  if not leaf.layers:
    w = src.rows(leaf.hf_name, start, stop)
    return w.T if leaf.transpose else w
  shape, kind = leaf.shape[1:], _PARTS[leaf.part][1]
  slabs = []
  for layer in leaf.layers[start:stop]:
    if kind == 'zeros':
      slabs.append(np.zeros(shape, np.float32))
      continue
    ws = _layer_sources(leaf, src, cfg, layer)[1]()
    if kind in ('experts_in', 'experts_out'):
      slabs.append(np.stack([w.T for w in ws]))
    else:
      slabs.append(_layer_from_hf(leaf.part, ws[0], shape))
  return np.stack(slabs)


def params_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """HF state dict (numpy arrays or torch tensors) -> palmax pure parameter dict (numpy).

  Raises ValueError naming a missing tensor, or a tensor with the wrong shape (got and expected).
  Tensors keep their dtype; extra tensors (e.g. rotary buffers, vision towers) are ignored.
  """
  src = DictSource(state_dict)
  check_source(src, cfg)
  params: dict = {}
  for leaf in leaves(cfg):
    node = params
    for p in leaf.path[:-1]:
      node = node.setdefault(p, {})
    node[leaf.path[-1]] = read_block(leaf, src, cfg, 0, leaf.shape[leaf.axis])
  return params


# ---- palmax -> HF ------------------------------------------------------------------------------

def _layer_to_hf(part: str, w: np.ndarray) -> np.ndarray:
  kind = _PARTS[part][1]
  if kind in ('q', 'kv'):
    d, n, h = w.shape
    return w.transpose(1, 2, 0).reshape(n * h, d)
  if kind == 'o':
    n, h, d = w.shape
    return w.transpose(2, 0, 1).reshape(d, n * h)
  if kind in ('in', 'out', 'router'):
    return w.T
  return w


def slab_to_hf(leaf: Leaf, slab: np.ndarray, cfg: ModelConfig, layer: int) -> list[tuple[str, np.ndarray]]:
  """One repeat of a stacked leaf -> its HF tensors (contiguous). A nonzero router bias (which
  Mixtral cannot hold) raises ValueError."""
  kind = _PARTS[leaf.part][1]
  names = [n for n, _ in hf_entries(leaf, cfg, layer)]
  if kind == 'zeros':
    if np.any(slab != 0):
      raise ValueError(f'{leaf.name} (layer {layer}) is nonzero; HF Mixtral has no router bias')
    return []
  if kind in ('experts_in', 'experts_out'):
    return [(n, np.ascontiguousarray(slab[e].T)) for e, n in enumerate(names)]
  return [(names[0], np.ascontiguousarray(_layer_to_hf(leaf.part, slab)))]


def hf_plan(cfg: ModelConfig, include_tied_lm_head: bool = False) -> list[tuple[str, tuple, Leaf, int | None]]:
  """Every HF tensor in file order: (name, shape, its palmax leaf, HF layer or None)."""
  plan = []
  all_leaves = leaves(cfg)
  whole = [leaf for leaf in all_leaves if not leaf.layers]
  plan += [(n, s, whole[0], None) for n, s in hf_entries(whole[0], cfg)]
  stacked = [leaf for leaf in all_leaves if leaf.layers]
  for layer in range(cfg.num_layers):
    for leaf in stacked:
      if layer in leaf.layers:
        plan += [(n, s, leaf, layer) for n, s in hf_entries(leaf, cfg, layer)]
  for leaf in whole[1:]:
    plan += [(n, s, leaf, None) for n, s in hf_entries(leaf, cfg)]
  if cfg.tie_embeddings and include_tied_lm_head:
    plan.append(('lm_head.weight', whole[0].shape, whole[0], None))
  return plan


def iter_hf(cfg: ModelConfig, read: Callable[[Leaf, int, int], np.ndarray],
            include_tied_lm_head: bool = False, rows_per_block: int = 0
            ) -> Iterator[tuple[str, Any]]:
  """Yields (HF name, tensor) in `hf_plan` order, reading palmax blocks with read(leaf, start,
  stop). Each layer's slab of a stacked leaf is read once; whole tensors come as an iterator of
  HF row blocks when `rows_per_block` > 0 (so a 256k-row embedding is never held whole)."""
  for leaf in leaves(cfg):
    if leaf.layers and _PARTS[leaf.part][1] == 'zeros':
      for r, layer in enumerate(leaf.layers):
        slab_to_hf(leaf, read(leaf, r, r + 1)[0], cfg, layer)  # Raises if nonzero.
  # A leaf's tensors for one layer are consecutive in the plan (e.g. Mixtral's E experts), so
  # only the current slab is kept: memory stays at one slab.
  cached: tuple = (None, None, {})   # (leaf name, repeat, its HF tensors)
  for name, shape, leaf, layer in hf_plan(cfg, include_tied_lm_head):
    if layer is None:
      yield name, _whole(leaf, read, shape[0], rows_per_block)
      continue
    r = leaf.layers.index(layer)
    if cached[:2] != (leaf.name, r):
      cached = (None, None, {})   # Free the previous slab before reading the next.
      cached = (leaf.name, r, dict(slab_to_hf(leaf, read(leaf, r, r + 1)[0], cfg, layer)))
    yield name, cached[2].pop(name)


def _whole(leaf: Leaf, read, rows: int, rows_per_block: int):
  def blocks():
    step = rows_per_block or rows
    for a in range(0, rows, step):
      w = read(leaf, a, min(rows, a + step))
      yield np.ascontiguousarray(w.T if leaf.transpose else w)
  return blocks() if rows_per_block else next(blocks())


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig,
                 include_tied_lm_head: bool = True) -> dict[str, np.ndarray]:
  """Palmax pure parameter dict -> HF state dict of numpy arrays (inverse of params_from_hf).

  With tied embeddings `lm_head.weight` is the embedding table (as in `model.state_dict()`);
  pass include_tied_lm_head=False to leave it out (as `save_pretrained` does).
  """
  def read(leaf: Leaf, start: int, stop: int) -> np.ndarray:
    node = params
    for p in leaf.path:
      node = node[p]
    idx = [slice(None)] * len(leaf.shape)
    idx[leaf.axis] = slice(start, stop)
    return np.asarray(node)[tuple(idx)]

  return dict(iter_hf(cfg, read, include_tied_lm_head))
