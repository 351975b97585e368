"""Frozen weight quantization for QLoRA (Dettmers et al. 2023): weight-only, dequantized on the fly.

`quantize(linear, cfg)` turns a `Linear` (model/layers.py) into a `QuantLinear` holding integer
codes and float32 scales; `apply` dequantizes to the param dtype and runs the weight's own einsum
exactly like `Linear.apply` (compute dtype, float32 accumulation), so a `LoraLinear` can wrap it.

Kinds (`KINDS`, a registry), all symmetric with no zero point:
  int8  per output channel: s = max|W| over the contracted axes / 127, q = clip(round(W/s), ±127)
        (LLM.int8()'s vector-wise absmax without the outlier decomposition).
  int4  per group of `group_size` contracted values: s = absmax / 7, q = clip(round(W/s), ±7), so
        q in [-7, 7] (nibble q + 8 in [1, 15]; nibble 0, i.e. -8, is never produced).
  nf4   per group: W/absmax in [-1, 1] -> index of the nearest of the 16 NormalFloat levels.
4-bit codes are packed two per uint8 along the contracted axis. No double quantization: scales
stay float32 (QLoRA's 8-bit scales save a further ~0.37 bit/param).

Storage layout ("canonical"): with L... the leading stacked axes, K the product of the weight's
contracted axes (flattened in weight order) and out... its output axes (weight order):
  codes  [L..., K, out...] int8 (int8) or [L..., K/2, out...] uint8 (int4/nf4, packed pairs)
  scales [L..., G, out...] float32, G = K / group_size (G = 1 for int8)
Logical names: L... and out... keep the weight's names. The K axis keeps the contracted axis's
name only for int8 with one contracted axis (same size, same meaning); otherwise (packed, grouped
or several flattened axes) it is None, replicated, so no rule can split a pair or mis-size it.
The scales' G axis is None. Bytes/param: int8 1 + 4/K, int4/nf4 0.5 + 4/group_size.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import peft
from model.layers import Linear, matmul

ALL_LINEARS = r'attn/w_(q|k|v|o)|mlp/w_(gate|up|down)'

# NF4 levels: bitsandbytes' NF4 table (bitsandbytes/functional.py, `create_normal_map(offset=
# 0.9677083, use_extra_value=True)`, as float32): quantiles of N(0, 1), 8 positive, 7 negative
# and an exact zero, scaled to [-1, 1] (QLoRA §3). tests/model/test_quant.py re-derives them.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def _nf4_encode(y: jax.Array) -> jax.Array:
  # Nearest level = the number of midpoints below y (the levels are sorted).
  mid = jnp.asarray([(a + b) / 2 for a, b in zip(NF4[:-1], NF4[1:])], jnp.float32)
  return jnp.searchsorted(mid, y, side='left').astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Kind:
  """One quantizer: scale = absmax / qmax over a group, codes = encode(W / scale),
  W ≈ decode(codes) * scale. `bits` 8: one int8 per value, one group per output channel;
  4: nibbles packed two per byte, groups of `group_size` along the contracted axes."""
  bits: int
  qmax: float
  encode: Callable[[jax.Array], jax.Array]   # float32 W/scale -> integer codes
  decode: Callable[[jax.Array], jax.Array]   # integer codes -> float32 W/scale
  levels: tuple[float, ...]                  # every value decode can give (sorted)


KINDS: dict[str, Kind] = {
    'int8': Kind(8, 127.0, lambda y: jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8),
                 lambda c: c.astype(jnp.float32), tuple(float(i) for i in range(-127, 128))),
    'int4': Kind(4, 7.0, lambda y: (jnp.clip(jnp.round(y), -7, 7) + 8).astype(jnp.uint8),
                 lambda c: c.astype(jnp.float32) - 8.0, tuple(float(i) for i in range(-7, 8))),
    'nf4': Kind(4, 1.0, _nf4_encode, lambda c: jnp.asarray(NF4, jnp.float32)[c], NF4),
}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """`kind` in KINDS; `group_size` contracted values per scale for the 4-bit kinds (QLoRA's NF4
  blocksize 64; must divide each quantized weight's contracted size), ignored for int8."""
  kind: str = 'nf4'
  group_size: int = 64

  def validate(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f'QuantConfig.kind={self.kind!r}: expected one of {", ".join(KINDS)}')
    g = self.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
      raise ValueError(f'QuantConfig.group_size={g!r}: expected an even int >= 2')


@functools.partial(jax.jit, static_argnames='axis')
def pack_nibbles(codes: jax.Array, axis: int = -1) -> jax.Array:
  """uint8 codes in [0, 15], even size n along `axis` -> n/2 bytes: c[2i] | c[2i+1] << 4."""
  c = jnp.moveaxis(codes.astype(jnp.uint8), axis, -1)
  return jnp.moveaxis(c[..., 0::2] | (c[..., 1::2] << 4), -1, axis)


@functools.partial(jax.jit, static_argnames='axis')
def unpack_nibbles(packed: jax.Array, axis: int = -1) -> jax.Array:
  """Inverse of `pack_nibbles`: n bytes along `axis` -> 2n codes in [0, 15] (uint8)."""
  b = jnp.moveaxis(packed, axis, -1)
  c = jnp.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[:-1] + (2 * b.shape[-1],))
  return jnp.moveaxis(c, -1, axis)


def _split(eq: str, shape: tuple[int, ...]):
  """(lead, weight letters, canonical letters ins+outs, in dims, out dims) of a weight."""
  lay = peft.Layout(eq, len(shape) - len(peft.Layout(eq, 0).specs[1]))
  return lay.lead, lay.specs[1], lay.ins + lay.outs, lay.in_shape(shape), lay.out_shape(shape)


# One compiled program per (shape, kind): eagerly, each rounding/reduction op compiles alone.
@functools.partial(jax.jit, static_argnames=('kind', 'eq', 'group_size'))
def _quantize(w: jax.Array, *, kind: str, eq: str, group_size: int):
  """w [L..., weight axes] -> (codes, scales) in the canonical layout (module docstring)."""
  k = KINDS[kind]
  lead, ws, canon, in_shape, out_shape = _split(eq, w.shape)
  lead_shape, kk, o = w.shape[:lead], math.prod(in_shape), math.prod(out_shape)
  g = kk if k.bits == 8 else group_size
  x = jnp.transpose(w.astype(jnp.float32),
                    tuple(range(lead)) + tuple(lead + ws.index(c) for c in canon))
  x = x.reshape(lead_shape + (kk // g, g, o))
  scale = jnp.max(jnp.abs(x), axis=-2, keepdims=True) / k.qmax        # [L..., G, 1, O]
  codes = k.encode(x / jnp.where(scale > 0, scale, 1.0)).reshape(lead_shape + (kk, o))
  if k.bits == 4:
    codes = pack_nibbles(codes, axis=-2)
  return (codes.reshape(lead_shape + codes.shape[-2:-1] + out_shape),
          scale.reshape(lead_shape + (kk // g,) + out_shape))


@functools.partial(jax.jit, static_argnames=('kind', 'eq', 'w_shape', 'dtype'))
def _dequantize(codes, scales, *, kind: str, eq: str, w_shape: tuple[int, ...], dtype):
  """(codes, scales) [L..., ...] -> the weight [L..., *w_shape] in `dtype`. L... is read off the
  codes' rank, so this works on sliced (scanned) and stacked values alike."""
  k = KINDS[kind]
  _, ws, canon, in_shape, out_shape = _split(eq, w_shape)
  lead = codes.ndim - 1 - len(out_shape)
  lead_shape, kk, o = codes.shape[:lead], math.prod(in_shape), math.prod(out_shape)
  gs = scales.shape[lead]
  q = codes.reshape(lead_shape + (codes.shape[lead], o))
  if k.bits == 4:
    q = unpack_nibbles(q, axis=-2)
  y = k.decode(q).reshape(lead_shape + (gs, kk // gs, o))
  y = (y * scales.reshape(lead_shape + (gs, 1, o))).reshape(lead_shape + in_shape + out_shape)
  y = jnp.transpose(y, tuple(range(lead)) + tuple(lead + canon.index(c) for c in ws))
  return y.astype(dtype)


class QuantCodes(nnx.Variable):
  """Quantized weight codes (int8, or uint8 nibble pairs). Not an nnx.Param: frozen, never
  trained, and `nnx.state(model, nnx.Param)` leaves it out; `nnx.state(model)` keeps it."""


class QuantScale(nnx.Variable):
  """float32 scales of quantized weight codes (frozen, like QuantCodes)."""


class QuantLinear(nnx.Module):
  """A frozen quantized `Linear`: x [B, T, in...] -> [B, T, out...], like `Linear.apply`.

  Data: `codes` (QuantCodes) and `scales` (QuantScale), layout in the module docstring.
  Static: `eq`, `kind`, `group_size` (None for int8), `dtype` (the original param dtype),
  `names` (the weight's logical names, leading axes included), `w_shape` (the weight's shape
  without leading axes). The `Linear` surface LoRA uses: `apply`, `shape`, `eq`, `dtype`,
  `get_metadata()` ({'out_sharding', 'eq'}), `dequantize()`, and for merging: `to_linear(w)`
  (alias `replace(w)`: a float `Linear`, same eq and names) and `self[...]` (= dequantize()).
  """

  def __init__(self, linear: Linear, cfg: QuantConfig):
    cfg.validate()
    shape = tuple(linear.shape)
    lay = peft.layout(linear)
    k = KINDS[cfg.kind]
    kk = math.prod(lay.in_shape(shape))
    if k.bits == 4 and kk % cfg.group_size:
      raise ValueError(f'quantize: weight of shape {shape} (einsum {linear.eq!r}) has contracted '
                       f'size {kk}, not a multiple of QuantConfig.group_size={cfg.group_size}')
    names = tuple(linear.get_metadata().get('out_sharding') or (None,) * len(shape))
    ws = lay.specs[1]
    name_of = lambda c: names[lay.lead + ws.index(c)]
    lead_names, out_names = names[:lay.lead], tuple(map(name_of, lay.outs))
    # The K axis keeps its name only when it is one unpacked contracted axis (int8 w_q: embed).
    k_name = name_of(lay.ins) if k.bits == 8 and len(lay.ins) == 1 else None
    codes, scales = _quantize(linear[...], kind=cfg.kind, eq=linear.eq,
                              group_size=cfg.group_size if k.bits == 4 else 0)
    self.eq, self.kind, self.dtype, self.names = linear.eq, cfg.kind, jnp.dtype(linear.dtype), names
    self.group_size = cfg.group_size if k.bits == 4 else None
    self.w_shape = shape[lay.lead:]
    self.codes = QuantCodes(codes, out_sharding=lead_names + (k_name,) + out_names,
                            eager_sharding=False)
    self.scales = QuantScale(scales, out_sharding=lead_names + (None,) + out_names,
                             eager_sharding=False)

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical weight shape, leading axes included ([R, D, N, H]; [D, N, H] under scan)."""
    lead = len(self.scales.shape) - 1 - len(peft.Layout(self.eq, 0).outs)
    return tuple(self.scales.shape[:lead]) + self.w_shape

  @property
  def nbytes(self) -> int:
    return int(self.codes.size * self.codes.dtype.itemsize
               + self.scales.size * self.scales.dtype.itemsize)

  def get_metadata(self) -> dict:
    return {'out_sharding': self.names, 'eq': self.eq}

  def dequantize(self, dtype=None) -> jax.Array:
    """The weight [L..., *w_shape] in `dtype` (default: the original param dtype)."""
    dtype = jnp.dtype(self.dtype if dtype is None else dtype)
    return _dequantize(self.codes[...], self.scales[...], kind=self.kind, eq=self.eq,
                       w_shape=self.w_shape, dtype=dtype)

  def apply(self, x: jax.Array, dtype) -> jax.Array:
    """`matmul(eq, x, dequantize(), dtype)`: the float Linear's exact path on Ŵ (the dequantized
    weight exists only inside the step; XLA can fuse it into the dot)."""
    return matmul(self.eq, x, self.dequantize(), dtype)

  def __getitem__(self, index) -> jax.Array:
    """`w[...]` as on a Linear: the dequantized weight (indexed)."""
    return self.dequantize()[index]

  def to_linear(self, value: jax.Array | None = None) -> Linear:
    """A float `Linear` with this weight's eq and logical names holding `value` (default: the
    dequantized weight), in the original param dtype."""
    value = self.dequantize() if value is None else value
    return Linear(jnp.asarray(value, self.dtype), out_sharding=self.names, eager_sharding=False,
                  eq=self.eq)

  replace = to_linear   # `Linear.replace(w)` spelling, as merge code written for Linear calls.


def quantize(linear: Linear, cfg: QuantConfig) -> QuantLinear:
  return QuantLinear(linear, cfg)


def quantize_model(model, cfg: QuantConfig, targets_regex: str = ALL_LINEARS) -> list[str]:
  """Replaces, in place, each block `Linear` of `model` (a Decoder) whose block-relative path
  ('attn/w_q') re.fullmatches `targets_regex` by a `QuantLinear`; returns the replaced paths
  ('stack0/block0/attn/w_q'). ValueError when nothing matches, when a match is not a plain
  Linear (MoE expert/router weight; already quantized; wrapped by LoRA/adapters: quantize
  first), or when a weight does not fit `cfg`; the model is unchanged then."""
  cfg.validate()
  try:
    regex = re.compile(targets_regex)
  except re.error as e:
    raise ValueError(f'quantize_model: targets {targets_regex!r} is not a regex ({e})') from None
  found, seen = [], []
  for path, rel, parent, name, value in peft.sites(model):
    seen.append(rel)
    if not regex.fullmatch(rel):
      continue
    if isinstance(value, QuantLinear):
      raise ValueError(f'quantize_model: {path} is already quantized')
    if isinstance(value, nnx.Module):
      raise ValueError(f'quantize_model: {path} is wrapped ({type(value).__name__}); quantize '
                       'before applying LoRA or adapters')
    if not isinstance(value, Linear):
      raise ValueError(f'quantize_model: targets {targets_regex!r} match {path}, which is not a '
                       'dense Linear weight (MoE expert/router weights are not quantized)')
    found.append((path, parent, name, value))
  if not found:
    raise ValueError(f'quantize_model: targets {targets_regex!r} match no Linear weight; '
                     f'expected a regex over paths such as {", ".join(dict.fromkeys(seen))}')
  quantized = [(path, parent, name, QuantLinear(value, cfg)) for path, parent, name, value in found]
  for _, parent, name, q in quantized:   # Only once all fit: all or nothing.
    setattr(parent, name, q)
  return [path for path, *_ in quantized]


def _quant_sites(model):
  """(path, parent module, attribute, QuantLinear) for every QuantLinear in `model`."""
  for path, module in list(nnx.iter_modules(model)):
    for name, value in list(vars(module).items()):
      if isinstance(value, QuantLinear):
        yield '/'.join(map(str, tuple(path) + (name,))), module, name, value


def quant_sites(model) -> dict[str, QuantLinear]:
  """{path: QuantLinear} of the quantized weights in `model` ('stack0/block0/attn/w_q', or
  '.../w_q/base' under a LoRA adapter), in model order."""
  return {path: value for path, _, _, value in _quant_sites(model)}


def dequantize_model(model) -> list[str]:
  """Replaces every `QuantLinear` in `model` (also a LoraLinear's `base`) by a float `Linear`
  holding its dequantized weight (same eq and names), in place; returns the paths."""
  found = list(_quant_sites(model))
  for _, parent, name, value in found:
    setattr(parent, name, value.to_linear())
  return [path for path, *_ in found]
