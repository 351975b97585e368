"""Muon on the hidden matrices (dimension numbers from each Linear's einsum), AdamW elsewhere;
its state is sharded like the parameters; a model learns with it."""
import jax
import ml_collections
from optax.contrib import MuonDimensionNumbers

from model import sharding
from tests.conftest import tiny_model_config
from train import optim, state as state_lib, step as step_lib

TRAIN = dict(lr=1e-2, muon_lr=0.02, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95,
             eps=1e-8, weight_decay=0.0, clip_norm=1.0)


def test_matrix_dimension_numbers_follow_the_einsums():
  cfg = tiny_model_config(tie_embeddings=False)
  dims = optim.matrix_dimension_numbers(cfg)
  block = dims['stack0']['block0']
  # [layers, d, n, h]: reduce d, output n and h; the layers axis is a batch axis.
  assert block['attn']['w_q'] == MuonDimensionNumbers((1,), (2, 3))
  assert block['attn']['w_o'] == MuonDimensionNumbers((1, 2), (3,))   # [layers, n, h, d]
  assert block['mlp']['w_down'] == MuonDimensionNumbers((1,), (2,))
  assert block['attn_norm']['scale'] is None
  assert dims['embedder']['embedding'] is None and dims['embedder']['unembedding'] is None


def test_muon_state_is_sharded_like_the_params_and_the_model_learns():
  cfg = tiny_model_config()
  tcfg = ml_collections.ConfigDict(dict(TRAIN, optimizer='muon'))
  tx, schedule = optim.make_optimizer(tcfg, 30, cfg)
  mesh, rules = sharding.mesh_from_config(ml_collections.ConfigDict(dict(
      data=2, pipeline=1, fsdp=4, expert=1, sequence=1, tensor=1, preset='',
      dcn={a: 1 for a in sharding.MESH_AXES}, rules=sharding.DEFAULT_RULES)))
  spec = state_lib.make_state_spec(cfg, tx, mesh, rules)
  flat_p = {k: v for k, v in jax.tree_util.tree_flatten_with_path(spec.param_shardings)[0]}
  w_q = ('stack0', 'block0', 'attn', 'w_q')
  matched = [sh for path, sh in jax.tree_util.tree_flatten_with_path(
      spec.state_shardings['opt_state'])[0]
      if tuple(str(k.key) for k in path if hasattr(k, 'key'))[-4:] == w_q]
  want = [v for k, v in flat_p.items() if tuple(str(x.key) for x in k) == w_q][0]
  assert matched and all(sh.spec == want.spec for sh in matched)
  assert any(a for a in want.spec)  # The check means something: w_q is sharded here.

  state = state_lib.init_state(spec, cfg, tx, 0)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule))
  tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, cfg.vocab_size)
  with sharding.use_mesh(mesh, rules):
    losses = []
    for _ in range(15):
      state, m = step(state, tokens)
      losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_optimizer_and_missing_model_are_refused():
  import pytest
  with pytest.raises(ValueError, match='config.train.optimizer'):
    optim.make_optimizer(ml_collections.ConfigDict(dict(TRAIN, optimizer='sgd')), 10)
  with pytest.raises(ValueError, match='muon'):
    optim.make_optimizer(ml_collections.ConfigDict(dict(TRAIN, optimizer='muon')), 10)
