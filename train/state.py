"""Creating the train state directly sharded on a mesh, and its shardings.

The model is first built abstractly (no memory); its logical axis names become NamedShardings
through the rules; then one jitted init writes every parameter and optimizer slot straight
into its shard, so nothing is ever materialised whole on one device.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding
from model.config import ModelConfig
from model.peft import methods as peft_lib
from train import trainable


@dataclasses.dataclass
class StateSpec:
  graphdef: Any
  abstract_params: Any        # pure dict of ShapeDtypeStruct
  param_shardings: Any        # pure dict of NamedSharding
  state_shardings: Any        # {'params', 'opt_state', 'step', 'rng'}
  abstract_state: Any         # ShapeDtypeStructs with shardings (restore target)
  trainable_mask: Any = None  # bools over the params (train/trainable.py); None = all train


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules,
                    peft: peft_lib.PeftConfig | None = None) -> tuple[Any, Any, Any]:
  """(graphdef, abstract params, NamedShardings) from the model's logical annotations (with
  `peft`'s adapters and quantized weights, model/peft/methods.py)."""
  graphdef, abs_state = nnx.split(peft_lib.abstract_model(model_cfg, peft))
  specs = nnx.get_partition_spec(abs_state).to_pure_dict()
  abs_params = abs_state.to_pure_dict()
  def one(path, spec, a):
    try:
      return NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), rules, a.shape, mesh))
    except sharding.ShardingError as e:  # Name the parameter: the rule table alone is ambiguous.
      raise sharding.ShardingError(f'parameter {jax.tree_util.keystr(path)} {tuple(spec)}: {e}') from None

  shardings = jax.tree_util.tree_map_with_path(one, specs, abs_params,
                                               is_leaf=lambda x: isinstance(x, P))
  return graphdef, abs_params, shardings


def make_state_spec(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules, trainable_pattern: str = '',
                    peft: peft_lib.PeftConfig | None = None) -> StateSpec:
  """The state's structure and shardings; `trainable_pattern` '' with a PEFT method trains
  what the method adds."""
  graphdef, abs_params, p_sh = param_shardings(model_cfg, mesh, rules, peft)
  mask = trainable.make_mask(abs_params, peft_lib.trainable_pattern(peft, trainable_pattern))
  replicated = NamedSharding(mesh, P())
  # The optimizer sees only the trainable parameters: frozen ones get no Adam moments.
  abs_opt = jax.eval_shape(tx.init, trainable.split(abs_params, mask)[0])
  # Optimizer slots (Adam mu/nu, Muon momentum) mirror the params and take their shardings.
  opt_sh = slot_shardings(abs_opt, trainable.split(abs_params, mask)[0],
                          trainable.split(p_sh, mask)[0], replicated)
  state_sh = {'params': p_sh, 'opt_state': opt_sh, 'step': replicated, 'rng': replicated}
  abs_state = {'params': abs_params, 'opt_state': abs_opt,
               'step': jax.ShapeDtypeStruct((), jnp.int32),
               'rng': jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, state_sh)
  return StateSpec(graphdef, abs_params, p_sh, state_sh, abs_state, mask)


def slot_shardings(abs_opt, abs_params, p_sh, default):
  """Each optimizer-state leaf whose dict-key path ends with a parameter's path and has its shape
  takes that parameter's sharding (any optax state: the slots nest the params' dicts inside
  tuples and masks); everything else (counts, masked-out nodes) gets `default`."""
  keys = lambda path: tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
  params = {keys(path): (a.shape, sh) for (path, a), sh in zip(
      jax.tree_util.tree_flatten_with_path(abs_params)[0], jax.tree.leaves(p_sh))}

  def one(path, leaf):
    k = keys(path)
    for i in range(len(k)):
      hit = params.get(k[i:])
      if hit is not None and hit[0] == getattr(leaf, 'shape', None):
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(one, abs_opt)


def init_state(spec: StateSpec, model_cfg: ModelConfig, tx: optax.GradientTransformation,
               seed: int, peft: peft_lib.PeftConfig | None = None) -> dict:
  """A fresh train state, created sharded by one jitted function."""

  def init():
    params = nnx.state(peft_lib.build_model(model_cfg, peft, seed)).to_pure_dict()
    return {'params': params,
            'opt_state': tx.init(trainable.split(params, spec.trainable_mask)[0]),
            'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.key_data(jax.random.key(seed + 1))}

  return jax.jit(init, out_shardings=spec.state_shardings)()
