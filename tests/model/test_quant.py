"""Frozen weight quantization for QLoRA (model/quant.py).

Round trips stay within half a code step (int8: s/2 per channel; int4/nf4: half the widest gap
between adjacent levels times the group scale); the NF4 table is re-derived from normal
quantiles; codes equal an independent numpy quantizer's; `QuantLinear.apply` is exactly
`matmul(eq, x, dequantize())`, also for stacked weights under nnx.scan; a quantized tiny Decoder
equals the float Decoder run on numpy-quantized weights, splits/merges, keeps codes and scales in
its pure dict and takes LoRA adapters (fresh ones change nothing). Stacked test weights have the
tiny Decoder's shapes, so the quantizer compiles once per shape and kind.
"""
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import peft, quant, transformer
from model.layers import Linear, matmul
from tests.conftest import tiny_model_config

GROUP = 16   # Divides the tiny model's contracted sizes (d_model 32, N*H 32, mlp_dim 48).
PATHS = [f'stack0/block0/{p}' for p in
         ('attn/w_q', 'attn/w_k', 'attn/w_v', 'attn/w_o', 'mlp/w_gate', 'mlp/w_up', 'mlp/w_down')]
# rms(logits - float logits) / rms(float logits) on the tiny random Decoder (2 layers, d 32,
# logits rms ~1), observed: int8 0.013 (max abs 0.05), int4 0.20 (0.66), nf4 0.27 (1.17). A
# random 32-wide model with groups of 16 is noisy; the numpy reference below pins the arithmetic.
REL_RMS_TOL = {'int8': 0.05, 'int4': 0.5, 'nf4': 0.5}
CONTRACTED = {'attn/w_o': (1, 2)}   # Weight axes x contracts ([R, ...] stacked); others (1,).


def _linear(shape, eq, names, seed=0):
  # numpy, not jax.random: eager random ops compile per shape (seconds each on this CPU).
  w = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
  return Linear(w, out_sharding=names, eager_sharding=False, eq=eq)


def _np_round_trip(w, ins, kind, group=GROUP):
  """Independent numpy quantize-dequantize of a stacked weight [R, ...]: flatten the contracted
  axes `ins` in weight order, absmax per group (int8: per output channel), nearest level."""
  k = quant.KINDS[kind]
  levels = np.asarray(k.levels, np.float32)
  w = np.asarray(w, np.float32)
  outs = [a for a in range(1, w.ndim) if a not in ins]
  x = np.transpose(w, [0, *ins, *outs])
  kk = math.prod(x.shape[1:1 + len(ins)])
  g = kk if kind == 'int8' else group
  y = x.reshape(x.shape[0], kk // g, g, -1)
  s = np.abs(y).max(axis=2, keepdims=True) / np.float32(k.qmax)
  idx = np.abs((y / np.where(s > 0, s, 1))[..., None] - levels).argmin(-1)
  return np.transpose((levels[idx] * s).reshape(x.shape), np.argsort([0, *ins, *outs]))


def _forward(model):
  graphdef = nnx.graphdef(model)
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])


def test_nf4_table_is_the_normal_quantiles():
  # QLoRA §3 / bitsandbytes create_normal_map(offset=0.9677083): 8 positive quantiles of
  # linspace(offset, 0.5, 9)[:-1], 7 negative of linspace(offset, 0.5, 8)[:-1], zero; / max.
  ppf, off = NormalDist().inv_cdf, 0.9677083
  lin = lambda n: [off + (0.5 - off) * i / (n - 1) for i in range(n)][:-1]
  v = sorted([ppf(p) for p in lin(9)] + [0.0] + [-ppf(p) for p in lin(8)])
  np.testing.assert_allclose(np.asarray(v) / max(v), quant.NF4, rtol=0, atol=5e-7)
  assert len(quant.NF4) == 16 and quant.NF4[7] == 0.0 and quant.NF4[0] == -1.0


@pytest.mark.parametrize('kind', list(quant.KINDS))
def test_round_trip_stays_within_half_a_step(kind):
  # A stacked w_o [R, N, H, D]: the contracted axes (n, h) flatten to K = N*H in weight order.
  r, n, h, d = 2, 4, 8, 32
  lin = _linear((r, n, h, d), 'btnh,nhd->btd', ('layers', 'heads', 'head_dim', 'embed'))
  w = np.asarray(lin[...]).copy()
  w[0, :, :, 0] = 0.0                      # An all-zero channel/group: scale 0, no NaN.
  lin[...] = jnp.asarray(w)
  q = quant.quantize(lin, quant.QuantConfig(kind, GROUP))
  got = np.asarray(q.dequantize())
  assert got.shape == w.shape and got.dtype == np.float32 and q.shape == w.shape
  scales = np.asarray(q.scales[...])
  k = quant.KINDS[kind]
  groups = 1 if kind == 'int8' else n * h // GROUP
  assert scales.shape == (r, groups, d)
  np.testing.assert_allclose(got, _np_round_trip(w, (1, 2), kind), rtol=0, atol=1e-6)
  gidx = (np.arange(n * h) // (n * h // groups)).reshape(n, h)
  s = scales[:, gidx, :]                                      # Each weight's scale, [R, N, H, D].
  half_gap = np.max(np.diff(k.levels)) / 2                    # int8/int4: 0.5; nf4: 0.1385.
  err = np.abs(got - w)
  assert np.all(err <= half_gap * s * (1 + 1e-5) + 1e-7), float(np.max(err / (s + 1e-30)))
  assert np.all(got[0, :, :, 0] == 0) and np.isfinite(got).all()
  if kind == 'int4':
    nib = np.asarray(quant.unpack_nibbles(q.codes[...], axis=1))
    assert nib.min() >= 1 and nib.max() <= 15                 # q + 8 with q in [-7, 7].


def test_packing_is_two_codes_per_byte():
  c = jnp.asarray(np.random.default_rng(1).integers(0, 16, (6, 10)), jnp.uint8)
  for axis in (0, 1, -1):
    p = quant.pack_nibbles(c, axis)
    assert p.dtype == jnp.uint8 and p.size == c.size // 2
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(p, axis)), np.asarray(c))
  lin = _linear((2, 32, 4, 8), 'btd,dnh->btnh', ('layers', 'embed', 'heads', 'head_dim'))
  numel = 2 * 32 * 4 * 8
  for kind, code_bytes in (('int8', numel), ('int4', numel // 2), ('nf4', numel // 2)):
    q = quant.quantize(lin, quant.QuantConfig(kind, GROUP))
    assert q.codes.size * q.codes.dtype.itemsize == code_bytes
    scale_bytes = 4 * 2 * 4 * 8 * (1 if kind == 'int8' else 32 // GROUP)
    assert q.nbytes == code_bytes + scale_bytes   # 4-bit: 0.5 + 4/GROUP bytes per weight.


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_apply_is_matmul_on_the_dequantized_weight(kind):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 32)), jnp.float32)
  w_q = _linear((32, 4, 8), 'btd,dnh->btnh', ('embed', 'heads', 'head_dim'), seed=3)
  w_o = _linear((4, 8, 32), 'btnh,nhd->btd', ('heads', 'head_dim', 'embed'), seed=4)
  cfg = quant.QuantConfig(kind, GROUP)
  qq, qo = quant.quantize(w_q, cfg), quant.quantize(w_o, cfg)
  for dtype in (jnp.float32, jnp.bfloat16):
    y = qq.apply(x, dtype)
    assert y.shape == (2, 3, 4, 8) and y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(matmul(w_q.eq, x, qq.dequantize(), dtype), np.float32))
    z = qo.apply(y, dtype)
    np.testing.assert_array_equal(np.asarray(z, np.float32),
                                  np.asarray(matmul(w_o.eq, y, qo.dequantize(), dtype), np.float32))
  # Metadata surface LoraLinear reads; names: the output axes keep theirs (module docstring).
  assert qo.get_metadata() == {'out_sharding': ('heads', 'head_dim', 'embed'), 'eq': w_o.eq}
  assert qo.eq == w_o.eq and qo.dtype == jnp.float32 and qo.shape == (4, 8, 32)
  assert qo.codes.get_metadata()['out_sharding'] == (None, 'embed')
  assert qq.codes.get_metadata()['out_sharding'] == (
      ('embed' if kind == 'int8' else None), 'heads', 'head_dim')


class _Holder(nnx.Module):
  def __init__(self, w):
    self.w = w


class _Stack(nnx.Module):
  """R layers x -> tanh(x W_r), the stacked weight [R, D, F] scanned over its leading axis."""

  def __init__(self, w):
    self.layers = _Holder(w)

  def __call__(self, x):
    def body(x, layer):
      return jnp.tanh(layer.w.apply(x, jnp.float32))
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_stacked_weight_under_scan(kind):
  lin = _linear((3, 32, 32), 'btd,df->btf', ('layers', 'embed', 'mlp'), seed=5)
  q = quant.quantize(lin, quant.QuantConfig(kind, GROUP))
  assert q.shape == (3, 32, 32) and q.codes.get_metadata()['out_sharding'][0] == 'layers'
  x = jnp.asarray(np.random.default_rng(6).normal(0, 0.2, (2, 3, 32)), jnp.float32)
  got = _Stack(q)(x)
  w_hat = q.dequantize()
  want = _Stack(q.replace(w_hat))(x)   # A plain stacked Linear holding the dequantized weight.
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  loop = x
  for r in range(3):
    loop = jnp.tanh(matmul(lin.eq, loop, w_hat[r], jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(loop), rtol=1e-6, atol=1e-6)


def test_bad_configs_give_one_line_errors():
  with pytest.raises(ValueError, match=r"^QuantConfig.kind='int3': expected one of int8, int4, "
                     r"nf4$"):
    quant.QuantConfig(kind='int3').validate()
  with pytest.raises(ValueError, match='group_size=3: expected an even int'):
    quant.QuantConfig('nf4', 3).validate()
  lin = _linear((32, 4, 8), 'btd,dnh->btnh', ('embed', 'heads', 'head_dim'))
  with pytest.raises(ValueError) as e:
    quant.quantize(lin, quant.QuantConfig('nf4', 64))
  msg = str(e.value)
  assert '\n' not in msg and '(32, 4, 8)' in msg and 'group_size=64' in msg
  quant.quantize(lin, quant.QuantConfig('int8', 64))   # int8 ignores group_size.


@pytest.fixture(scope='module')
def base():
  """(float model, its jitted forward, tokens, its logits), built once; tests use clones."""
  model = transformer.build(tiny_model_config(), seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  fwd = _forward(model)
  return model, fwd, tokens, fwd(nnx.state(model), tokens)


@pytest.fixture(scope='module')
def nf4_model(base):
  model = nnx.clone(base[0])
  quant.quantize_model(model, quant.QuantConfig('nf4', GROUP))
  fwd = _forward(model)
  return model, fwd, fwd(nnx.state(model), base[2])


@pytest.mark.parametrize('kind', list(quant.KINDS))
def test_quantized_decoder_is_close_and_round_trips(base, nf4_model, kind):
  fmodel, ffwd, tokens, want = base
  if kind == 'nf4':
    model, fwd, got = nf4_model
  else:
    model = nnx.clone(fmodel)
    assert sorted(quant.quantize_model(model, quant.QuantConfig(kind, GROUP))) == sorted(PATHS)
    fwd = _forward(model)
    got = fwd(nnx.state(model), tokens)
  rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))
  rel = rms(got - want) / rms(want)
  print(f'{kind}: rel rms logit error {rel:.3f}, max abs {float(jnp.max(jnp.abs(got - want))):.3f}')
  assert 0 < rel < REL_RMS_TOL[kind]
  ref = nnx.clone(fmodel)       # The float model on independently quantized weights.
  for _, rel_path, _, _, v in peft.sites(ref):
    v[...] = jnp.asarray(_np_round_trip(v[...], CONTRACTED.get(rel_path, (1,)), kind))
  np.testing.assert_allclose(np.asarray(ffwd(nnx.state(ref), tokens)), np.asarray(got),
                             rtol=0, atol=1e-5)
  tree = nnx.state(model).to_pure_dict()['stack0']['block0']
  assert set(tree['attn']['w_q']) == {'codes', 'scales'}
  assert tree['mlp']['w_down']['codes'].dtype == (jnp.int8 if kind == 'int8' else jnp.uint8)
  params = [jax.tree_util.keystr(p, simple=True, separator='/') for p, _ in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]]
  assert 'stack0/block0/attn_norm/scale' in params                   # Codes are not Params.
  assert not any('/attn/' in p or '/mlp/' in p for p in params), params
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)
  assert isinstance(merged.stack0.block0.attn.w_o, quant.QuantLinear)
  np.testing.assert_array_equal(np.asarray(fwd(nnx.state(merged), tokens)), np.asarray(got))
  if kind == 'nf4':
    return   # The module fixture stays quantized for the LoRA tests.
  # Dequantized: the float model's tree again, with the quantized model's logits.
  assert sorted(quant.dequantize_model(model)) == sorted(PATHS)
  assert isinstance(model.stack0.block0.attn.w_q, Linear)
  assert model.stack0.block0.attn.w_o.get_metadata()['eq'] == 'btnh,nhd->btd'
  assert (jax.tree.map(jnp.shape, nnx.state(model).to_pure_dict())
          == jax.tree.map(jnp.shape, nnx.state(fmodel).to_pure_dict()))
  np.testing.assert_allclose(np.asarray(ffwd(nnx.state(model), tokens)), np.asarray(got),
                             rtol=0, atol=1e-5)


def test_abstract_quantization_and_targets(base, nf4_model):
  def build_quantized():
    m = transformer.build(tiny_model_config(), seed=0)
    quant.quantize_model(m, quant.QuantConfig('nf4', GROUP))
    return m

  abstract = nnx.state(nnx.eval_shape(build_quantized)).to_pure_dict()
  real = nnx.state(nf4_model[0]).to_pure_dict()
  sd = lambda a: (tuple(a.shape), jnp.dtype(a.dtype))
  assert jax.tree.map(sd, abstract) == jax.tree.map(sd, real)
  model = nnx.clone(base[0])
  with pytest.raises(ValueError, match='match no Linear weight; expected a regex over paths'):
    quant.quantize_model(model, quant.QuantConfig('int8'), 'attn/w_x')
  # w_down (K = 48) does not fit groups of 32: nothing is replaced, not even w_q (K = 32).
  with pytest.raises(ValueError, match=r'\(2, 48, 32\).*group_size=32'):
    quant.quantize_model(model, quant.QuantConfig('int4', 32))
  assert isinstance(model.stack0.block0.attn.w_q, Linear)
  assert quant.quantize_model(model, quant.QuantConfig('int8'), r'attn/w_q') == PATHS[:1]
  assert list(quant.quant_sites(model)) == PATHS[:1]


def test_lora_on_a_quantized_base(base, nf4_model):
  tokens = base[2]
  model, _, want = nf4_model
  model = nnx.clone(model)
  # w_k and w_v share a shape, so A's init compiles once.
  lcfg = peft.LoraConfig(rank=4, alpha=8.0, targets=r'attn/w_(k|v)')
  assert sorted(peft.apply_lora(model, lcfg)) == [PATHS[1], PATHS[2]]
  w_v = model.stack0.block0.attn.w_v
  assert isinstance(w_v, peft.LoraLinear) and isinstance(w_v.base, quant.QuantLinear)
  assert w_v.lora_a.get_metadata()['out_sharding'] == ('layers', 'embed', None)
  assert w_v.lora_b.get_metadata()['out_sharding'] == ('layers', None, 'kv_heads', 'head_dim')
  fwd = _forward(model)
  got = fwd(nnx.state(model), tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))   # B = 0: unchanged.
  assert 'stack0/block0/attn/w_v/base' in quant.quant_sites(model)
  rng = np.random.default_rng(0)
  peft.load_lora_params(model, jax.tree.map(lambda a: 0.1 * rng.normal(size=a.shape),
                                            peft.lora_params(model)))
  # QLoRA training: gradients reach the adapter; the uint8 codes are frozen inputs (checked on
  # the adapted weight alone: differentiating the whole Decoder compiles for seconds).
  graphdef, lora, rest = nnx.split(w_v, peft.LoraParam, ...)
  layer0 = lambda state: jax.tree.map(lambda a: a[0], state)   # What nnx.scan hands a layer.
  x = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
  loss = lambda lora, rest: jnp.sum(nnx.merge(graphdef, lora, rest).apply(x, jnp.float32) ** 2)
  grads = jax.jit(jax.grad(loss))(layer0(lora), layer0(rest))
  assert len(jax.tree.leaves(grads)) == 2   # A and B only; no codes or scales.
  assert all(np.isfinite(g).all() and np.any(g) for g in jax.tree.leaves(grads))
  # merge_lora folds A·B into the dequantized weight: a float Linear, same names.
  want_w = np.asarray(w_v.base.dequantize() + w_v.delta())
  assert sorted(peft.merge_lora(model)) == [PATHS[1], PATHS[2]]
  merged = model.stack0.block0.attn.w_v
  assert isinstance(merged, Linear) and merged.get_metadata()['eq'] == 'btd,dkh->btkh'
  assert merged.get_metadata()['out_sharding'] == ('layers', 'embed', 'kv_heads', 'head_dim')
  np.testing.assert_allclose(np.asarray(merged[...]), want_w, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match='already quantized'):
    quant.quantize_model(model, quant.QuantConfig('nf4', GROUP), 'mlp/w_up')
