"""LoRA surgery (model/peft/lora.py) and PEFT-format adapters (model/peft/hf.py).

A fresh adapter must leave the forward bit-identical (B = 0); merging must match the unmerged
adapter within 1e-5; an adapter exported from palmax and loaded by `peft` on the same HF base
must give palmax's logits within 1e-4 (float32), and a `peft`-made adapter imported into palmax
the same.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import hf_weights, layers, peft, transformer
from model.peft import hf as peft_hf
from model.config import MoEConfig
from tests.conftest import tiny_model_config

ALL = r'attn/w_(q|k|v|o)|mlp/w_(gate|up|down)'


def _forward(model):
  """A jitted forward f(params, tokens) -> logits for models of `model`'s graph."""
  graphdef = nnx.graphdef(model)
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])


def _randomize(model, seed=1, std=0.1):
  """Random non-zero A and B, so the adapters change the outputs visibly."""
  rng = np.random.default_rng(seed)   # numpy: eager jax.random would compile per shape.
  peft.load_lora_params(model, jax.tree.map(lambda a: std * rng.normal(size=a.shape),
                                            peft.lora_params(model)))


@pytest.fixture(scope='module')
def tokens():
  return jax.random.randint(jax.random.key(0), (2, 9), 0, 61, dtype=jnp.int32)


@pytest.fixture(scope='module')
def base(tokens):
  """(model, its jitted forward, its logits): built once; tests change `nnx.clone`s of it.
  Tests keep rank 4 so A's init compiles once per weight shape."""
  model = transformer.build(tiny_model_config())
  fwd = _forward(model)
  return model, fwd, fwd(nnx.state(model), tokens)


def test_fresh_adapter_is_exact_and_surgery_replaces_exactly_the_targets(base, tokens):
  cfg = tiny_model_config()
  model, fwd, want = nnx.clone(base[0]), base[1], base[2]
  before = jax.tree.map(jnp.shape, nnx.state(model).to_pure_dict())
  lcfg = peft.LoraConfig(rank=4, alpha=8.0)   # Default targets: attn/w_(q|v).
  assert peft.apply_lora(model, lcfg) == ['stack0/block0/attn/w_q', 'stack0/block0/attn/w_v']
  attn = model.stack0.block0.attn
  assert isinstance(attn.w_k, layers.Linear) and isinstance(model.stack0.block0.mlp.w_up,
                                                            layers.Linear)
  r, d, n, k, h = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  assert attn.w_q.lora_a.shape == (r, d, 4) and attn.w_q.lora_b.shape == (r, 4, n, h)
  assert attn.w_v.lora_b.shape == (r, 4, k, h) and attn.w_q.scale == 2.0
  assert attn.w_q.lora_a.get_metadata()['out_sharding'] == ('layers', 'embed', None)
  assert attn.w_q.lora_b.get_metadata()['out_sharding'] == ('layers', None, 'heads', 'head_dim')
  assert not np.any(np.asarray(attn.w_q.lora_b[...]))
  bound = 1 / math.sqrt(d)   # Kaiming-uniform(a=sqrt(5)) as PEFT: U(-1/sqrt(fan_in), ...).
  assert 0.5 * bound < float(jnp.max(jnp.abs(attn.w_q.lora_a[...]))) <= bound
  got = _forward(model)(nnx.state(model), tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))   # B = 0: bit-identical.
  # The merged model has exactly the base's parameter tree.
  assert peft.merge_lora(model) == ['stack0/block0/attn/w_q', 'stack0/block0/attn/w_v']
  assert jax.tree.map(jnp.shape, nnx.state(model).to_pure_dict()) == before
  np.testing.assert_array_equal(np.asarray(fwd(nnx.state(model), tokens)), np.asarray(want))
  assert model.stack0.block0.attn.w_o.get_metadata()['eq'] == 'btnh,nhd->btd'


def test_merged_equals_unmerged_and_a_float64_reference(base, tokens):
  model, fwd, base_logits = nnx.clone(base[0]), base[1], base[2]
  w_o = np.asarray(model.stack0.block0.attn.w_o[...], np.float64)
  paths = peft.apply_lora(model, peft.LoraConfig(rank=4, alpha=5.0, targets=ALL), seed=7)
  assert len(paths) == 7
  _randomize(model)
  unmerged = _forward(model)(nnx.state(model), tokens)
  graphdef = nnx.graphdef(model)   # Unmerged serving: a KV-cache prefill gives the same logits.
  prefill = jax.jit(lambda p, t: (lambda m: m(t, m.init_cache(2, 16))[0])(nnx.merge(graphdef, p)))
  np.testing.assert_allclose(prefill(nnx.state(model), tokens), unmerged, rtol=0, atol=1e-5)
  lo = model.stack0.block0.attn.w_o
  a, b = np.asarray(lo.lora_a[...], np.float64), np.asarray(lo.lora_b[...], np.float64)
  merged_model = nnx.clone(model)
  peft.merge_lora(merged_model)
  # w_o [R, N, H, D] + (5/4) · A [R, N, H, r] · B [R, r, D], in float64.
  ref = w_o + 5.0 / 4.0 * np.einsum('lnhr,lrd->lnhd', a, b)
  np.testing.assert_allclose(np.asarray(merged_model.stack0.block0.attn.w_o[...]), ref,
                             rtol=0, atol=1e-6)
  merged = fwd(nnx.state(merged_model), tokens)   # The base's graph again.
  err = float(jnp.max(jnp.abs(merged - unmerged)))
  print(f'\n[lora] max|merged - unmerged| {err:.2e}, '
        f'max|lora - base| {float(jnp.max(jnp.abs(unmerged - base_logits))):.2e}')
  assert err < 1e-5
  assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 1e-2   # The adapter does something.


def test_rslora_scale_and_dropout_only_with_an_rng(base):
  assert peft.LoraConfig(rank=16, alpha=32.0).scale == 2.0
  assert peft.LoraConfig(rank=16, alpha=32.0, rslora=True).scale == 8.0   # alpha / sqrt(r).
  cfg = tiny_model_config()
  model = nnx.clone(base[0])
  peft.apply_lora(model, peft.LoraConfig(rank=4, alpha=4.0, rslora=True, dropout=0.5))
  assert model.stack0.block0.attn.w_q.scale == 2.0
  # An unstacked weight (no leading layers axis) works the same.
  w = layers.linear(nnx.Rngs(0), layers.fan_in_init([0]), (cfg.d_model, 4, 8),
                    ('embed', 'heads', 'head_dim'), jnp.float32, 'btd,dnh->btnh')
  one = peft.LoraLinear(w, peft.LoraConfig(rank=4, dropout=0.5), jax.random.key(0))
  assert one.lora_a.shape == (cfg.d_model, 4) and one.lora_b.shape == (4, 4, 8)
  one.lora_b[...] = jnp.ones(one.lora_b.shape)
  x = jax.random.normal(jax.random.key(2), (1, 3, cfg.d_model))
  y, again, dropped = jax.jit(lambda x: (one.apply(x, jnp.float32), one.apply(x, jnp.float32),
                                         one.apply(x, jnp.float32, rng=jax.random.key(3))))(x)
  np.testing.assert_array_equal(y, again)
  assert not np.allclose(y, dropped)


def test_bad_config_and_no_match_errors(base):
  model = nnx.clone(base[0])
  for field, kwargs in (('rank', dict(rank=0)), ('rank', dict(rank=2.0)), ('alpha', dict(alpha=0)),
                        ('dropout', dict(dropout=1.0)), ('targets', dict(targets='(')),
                        ('rslora', dict(rslora=1))):
    with pytest.raises(ValueError, match=rf'LoraConfig\.{field}='):
      peft.apply_lora(model, peft.LoraConfig(**kwargs))
  with pytest.raises(ValueError, match=r"targets='attn/q_proj' matches no linear.*attn/w_q"):
    peft.apply_lora(model, peft.LoraConfig(targets='attn/q_proj'))
  with pytest.raises(ValueError, match='matches no linear'):
    peft.apply_lora(model, peft.LoraConfig(targets='w_q'))   # fullmatch: block-relative paths.
  peft.apply_lora(model, peft.LoraConfig(rank=4))
  with pytest.raises(ValueError, match='stack0/block0/attn/w_q already has a LoRA adapter'):
    peft.apply_lora(model, peft.LoraConfig(rank=4))
  tree = peft.lora_params(model)
  tree['stack0']['block0']['attn']['w_v']['lora_b'] = np.zeros((1, 2, 3))
  with pytest.raises(ValueError, match=r'stack0/block0/attn/w_v/lora_b is \(1, 2, 3\)'):
    peft.load_lora_params(model, tree)
  moe = transformer.abstract(tiny_model_config(moe=MoEConfig(num_experts=4, top_k=2,
                                                             expert_mlp_dim=16)))
  with pytest.raises(ValueError, match='stack0/block0/mlp/w_up, which is not a dense Linear'):
    peft.apply_lora(moe, peft.LoraConfig(targets='mlp/w_up'))


def test_abstract_model_gets_adapters_for_sharding_and_state_specs():
  # What a trainer needs: apply_lora on the abstract model, then partition specs of the tree.
  cfg = tiny_model_config()

  def build():
    model = transformer.Decoder(cfg, nnx.Rngs(params=0))
    peft.apply_lora(model, peft.LoraConfig(targets='attn/w_o|mlp/w_down'))
    return model

  abs_model = nnx.eval_shape(build)
  specs = nnx.get_partition_spec(nnx.state(abs_model)).to_pure_dict()['stack0']['block0']
  assert tuple(specs['attn']['w_o']['lora_a']) == ('layers', 'heads', 'head_dim', None)
  assert tuple(specs['mlp']['w_down']['lora_b']) == ('layers', None, 'embed')
  only = nnx.state(abs_model, peft.LoraParam).to_pure_dict()['stack0']['block0']
  assert set(only) == {'attn', 'mlp'} and set(only['mlp']['w_down']) == {'lora_a', 'lora_b'}


def test_hf_layout_of_the_update_matches_the_base_weight_mapping():
  # B_hf · A_hf must be the HF form (hf_weights._layer_to_hf) of the palmax update A · B.
  rng = np.random.default_rng(0)
  d, n, h, f, r = 6, 3, 4, 5, 2
  for part, in_shape, out_shape in (('w_q', (d,), (n, h)), ('w_o', (n, h), (d,)),
                                    ('mlp.w_gate', (d,), (f,)), ('mlp.w_down', (f,), (d,))):
    a, b = rng.normal(size=in_shape + (r,)), rng.normal(size=(r,) + out_shape)
    delta = np.tensordot(a, b, axes=([-1], [0]))   # [in..., out...]
    a_hf, b_hf = peft_hf.to_hf(a, b)
    np.testing.assert_allclose(b_hf @ a_hf, hf_weights._layer_to_hf(part, delta), atol=1e-12)
    a2, b2 = peft_hf.from_hf(a_hf, b_hf, in_shape, out_shape)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)


def test_export_import_round_trip_and_bad_files(base, tmp_path):
  safetensors = pytest.importorskip('safetensors.numpy')
  cfg = tiny_model_config()
  model = nnx.clone(base[0])
  lcfg = peft.LoraConfig(rank=4, alpha=3.0, dropout=0.1, targets=ALL, rslora=True)
  peft.apply_lora(model, lcfg)
  _randomize(model)
  out = str(tmp_path / 'adapter')
  peft_hf.export_peft(model, lcfg, cfg, out, 'base-dir')
  c = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert (c['r'], c['lora_alpha'], c['use_rslora'], c['lora_dropout']) == (4, 3.0, True, 0.1)
  assert c['target_modules'] == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                                        'up_proj', 'down_proj'])
  tensors = safetensors.load_file(os.path.join(out, 'adapter_model.safetensors'))
  assert len(tensors) == 2 * 7 * cfg.num_layers
  pre = 'base_model.model.model.layers.1.'
  assert tensors[pre + 'self_attn.q_proj.lora_A.weight'].shape == (4, cfg.d_model)
  assert tensors[pre + 'self_attn.k_proj.lora_B.weight'].shape == (2 * 8, 4)
  assert tensors[pre + 'self_attn.o_proj.lora_A.weight'].shape == (4, 4 * 8)
  assert tensors[pre + 'mlp.down_proj.lora_B.weight'].shape == (cfg.d_model, 4)
  lo = model.stack0.block0.attn.w_k   # Layer 1 = repeat 1; B [r, K, H] -> [K*H, r].
  np.testing.assert_array_equal(tensors[pre + 'self_attn.k_proj.lora_B.weight'],
                                np.asarray(lo.lora_b[...][1]).reshape(4, 16).T)
  fresh = nnx.clone(base[0])
  got = peft_hf.import_peft(fresh, out, cfg)
  assert (got.rank, got.alpha, got.rslora, got.dropout, got.scale) == (4, 3.0, True, 0.1,
                                                                      lcfg.scale)
  jax.tree.map(np.testing.assert_array_equal, peft.lora_params(fresh), peft.lora_params(model))

  def broken(edit, **cfg_edit):
    d = tmp_path / f'bad{len(os.listdir(tmp_path))}'
    d.mkdir()
    json.dump({**c, **cfg_edit}, open(d / 'adapter_config.json', 'w'))
    t = dict(tensors)
    edit(t)
    safetensors.save_file(t, str(d / 'adapter_model.safetensors'))
    return str(d)

  name = pre + 'mlp.up_proj.lora_B.weight'
  cases = [
      (broken(lambda t: t.update({name: np.zeros((3, 2), np.float32)})),
       rf"adapter_model.safetensors: tensor '{name}' has shape \(3, 2\), expected \(48, 4\)"),
      (broken(lambda t: t.pop(name)), f'adapter_model.safetensors: missing tensor {name}'),
      (broken(lambda t: t.update({'base_model.model.model.layers.2.mlp.up_proj.lora_A.weight':
                                  np.zeros((4, 32), np.float32)})),
       r"layers.2.mlp.up_proj.lora_A.weight' matches no layer of this model \(2 layers\)"),
      (broken(lambda t: None, use_dora=True), r'adapter_config.json: use_dora=True'),
      (broken(lambda t: None, r=0), r'adapter_config.json: LoraConfig.rank=0'),
      (broken(lambda t: t.update({'base_model.model.lm_head.lora_A.weight':
                                  np.zeros((2, 32), np.float32)})),
       r"tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA A/B weight"),
  ]
  (tmp_path / 'empty').mkdir()
  cases.append((str(tmp_path / 'empty'), 'adapter_config.json: cannot read'))
  plain = nnx.clone(base[0])
  for directory, message in cases:
    with pytest.raises(ValueError, match=message):
      peft_hf.import_peft(plain, directory, cfg)
    assert not peft.lora_sites(plain)   # Refused before any surgery.


@pytest.mark.slow
def test_peft_library_loads_palmax_adapters_and_palmax_imports_peft_adapters(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft_lib = pytest.importorskip('peft')
  from launch import convert, workdir as workdir_lib
  from tests.launch.test_convert import _hf_dir
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  convert.run('hf', None, 'llama', src, str(tmp_path / 'px'), log=lambda *_: None)
  _, model_cfg, graphdef, params, _ = workdir_lib.load_model(str(tmp_path / 'px'))
  tokens = np.random.default_rng(0).integers(3, 96, (3, 11))

  def hf_base():
    return transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation='eager').eval()

  def torch_logits(m):
    with torch.no_grad():
      return m(torch.as_tensor(tokens)).logits.numpy()

  base = torch_logits(hf_base())
  # palmax adapter -> PEFT.
  model = nnx.merge(graphdef, params)
  lcfg = peft.LoraConfig(rank=4, alpha=8.0, targets=ALL)
  peft.apply_lora(model, lcfg)
  _randomize(model)
  fwd = _forward(model)
  ours = np.asarray(fwd(nnx.state(model), jnp.asarray(tokens, jnp.int32)))
  peft_hf.export_peft(model, lcfg, model_cfg, str(tmp_path / 'adapter'), src)
  theirs = torch_logits(peft_lib.PeftModel.from_pretrained(hf_base(), str(tmp_path / 'adapter')))
  err, moved = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs - base)))
  # palmax imports what it exported: same graph, same logits.
  again = nnx.merge(graphdef, params)
  peft_hf.import_peft(again, str(tmp_path / 'adapter'), model_cfg)
  back = np.asarray(fwd(nnx.state(again), jnp.asarray(tokens, jnp.int32)))
  # A PEFT-made adapter (rsLoRA: scale 6 / sqrt(4), random B) -> palmax.
  torch.manual_seed(1)
  made = peft_lib.get_peft_model(hf_base(), peft_lib.LoraConfig(
      r=4, lora_alpha=6, use_rslora=True, target_modules=['q_proj', 'o_proj', 'up_proj',
                                                          'down_proj'], task_type='CAUSAL_LM'))
  with torch.no_grad():
    for name, p in made.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.1)
  made.save_pretrained(str(tmp_path / 'made'))
  want = torch_logits(made.eval())
  imported = nnx.merge(graphdef, params)
  icfg = peft_hf.import_peft(imported, str(tmp_path / 'made'), model_cfg)
  assert (icfg.rank, icfg.rslora, icfg.scale) == (4, True, 3.0)
  assert set(peft.lora_sites(imported)) == {f'stack0/block0/{p}' for p in (
      'attn/w_q', 'attn/w_o', 'mlp/w_up', 'mlp/w_down')}
  got = np.asarray(_forward(imported)(nnx.state(imported), jnp.asarray(tokens, jnp.int32)))
  err2, moved2 = float(np.max(np.abs(got - want))), float(np.max(np.abs(want - base)))
  print(f'\n[peft parity] palmax->peft max|dlogits| {err:.2e} (adapter moved {moved:.2e}); '
        f'round trip {float(np.max(np.abs(back - ours))):.2e}; peft->palmax {err2:.2e} '
        f'(moved {moved2:.2e})')
  assert err < 1e-4 and moved > 1e-2
  np.testing.assert_array_equal(back, ours)
  assert err2 < 1e-4 and moved2 > 1e-2


def test_lora_dropout_acts_in_training_steps_only(base, tokens):
  """Dropout on the adapter's input: a training step's gradients depend on the step's key (a
  different key, different B updates; the same key, the same ones); forwards without a key
  (evaluation, serving) are deterministic and equal dropout 0's."""
  import optax
  from train import objectives, step as step_lib, trainable
  from model.peft import lora as lora_lib

  def state_for(dropout):
    model = nnx.clone(base[0])
    peft.apply_lora(model, peft.LoraConfig(rank=4, alpha=8.0, dropout=dropout))
    _randomize(model)
    return model

  def one_step(model, rng_seed):
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    mask = trainable.make_mask(params, 'lora_')
    tx = optax.sgd(1.0)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1.0),
                                            objective=objectives.get('lm')(None, z_loss=0.0),
                                            trainable_mask=mask))
    state = {'params': params, 'opt_state': tx.init(trainable.split(params, mask)[0]),
             'step': jnp.zeros((), jnp.int32),
             'rng': jax.random.key_data(jax.random.key(rng_seed))}
    new, _ = step(state, {'tokens': jnp.concatenate([tokens, tokens[:, :1]], axis=1)})
    return np.asarray(new['params']['stack0']['block0']['attn']['w_q']['lora_b'])

  dropped = state_for(0.5)
  a, b, c = one_step(dropped, 0), one_step(dropped, 0), one_step(dropped, 1)
  plain = one_step(state_for(0.0), 0)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-6 and np.abs(a - plain).max() > 1e-6
  # No key, no dropout: the eval forward equals the dropout-0 model's.
  fwd = _forward(dropped)
  np.testing.assert_array_equal(fwd(nnx.state(dropped), tokens),
                                fwd(nnx.state(state_for(0.0)), tokens))
  assert lora_lib.set_dropout_keys(nnx.clone(dropped), jax.random.key(0)) == 2
