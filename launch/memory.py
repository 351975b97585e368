"""Compile the train step for a mesh you do not have and print per-device memory and FLOPs.

  python -m launch.memory --config=configs/palm_8b.py --devices=256 [--config.mesh.fsdp=-1 ...]
  python -m launch.memory --config=configs/palm_8b.py --topology=v5p:4x4x8   # v5p-256, needs libtpu
  python -m launch.memory --config=configs/tiny.py --devices=1 --seq_lens=2048,8192,32768 \
      --config.model.attention_impl=flash   # temp bytes by training length: linear vs quadratic

Nothing is allocated: the train state is abstract (ShapeDtypeStructs carrying their shardings),
and the jitted step is lowered and compiled ahead of time. Parameter and optimizer bytes per
device come from the shardings (exact on any backend); argument/output/temp bytes and FLOPs come
from the compiled executable's memory and cost analysis.

Targets:
  --devices=N     N simulated CPU devices (XLA:CPU). Exact for the sharding arithmetic; temp
                  (activation) bytes and FLOPs are XLA:CPU's, which fuses, lays out and
                  rematerialises differently from XLA:TPU, so treat them as an estimate.
  --topology=T    compile-only TPU devices of topology T (e.g. v5p:4x4x8 = 128 chips, v5p-256)
                  through jax.experimental.topologies: XLA:TPU's own memory analysis, no TPU
                  needed, but libtpu must be installed (`pip install 'jax[tpu]'`).
"""
from __future__ import annotations

import math
import os

GiB = 1024 ** 3


def _define_flags() -> dict:
  """The command's flags, defined only when it runs as a program: tests import `analyze` next to
  other launchers that define --config too."""
  from absl import flags
  from ml_collections import config_flags
  f = dict(config=config_flags.DEFINE_config_file('config', None, 'Training config file.'),
           devices=flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (ignored with '
                                        '--topology).'),
           topology=flags.DEFINE_string('topology', None, 'TPU topology for compile-only devices, '
                                        'e.g. v5p:4x4x8 (needs libtpu).'),
           seq_lens=flags.DEFINE_list('seq_lens', None, 'Compile at each of these training '
                                      'lengths (config.data.seq_len) and print a table of temp '
                                      'bytes, e.g. 2048,8192,32768.'))
  flags.mark_flag_as_required('config')
  return f


def _bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
  total = 0
  for a in _leaves(abstract_tree):
    shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += math.prod(shard) * a.dtype.itemsize
  return total


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def tpu_devices(topology: str) -> list:
  """Compile-only devices of a TPU topology (no TPU needed; libtpu does the compiling)."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology, platform='tpu').devices)
  except Exception as e:  # Missing libtpu or an unknown topology name: say which.
    raise ValueError(f'--topology={topology!r}: could not create compile-only TPU devices ({e}). '
                     "This needs libtpu (pip install 'jax[tpu]'); topology names look like "
                     "v5p:4x4x8 or v5e:16x16.") from None


def analyze(cfg, devices=None) -> dict:
  """Compiles cfg's train step for a mesh over `devices` (default: all) without allocating it.

  Returns bytes per device: params, opt_state, argument/output/alias/temp from the compiled
  memory analysis, peak (= argument + output - alias + temp) and flops (per device, from the
  compiled cost analysis) next to the model FLOPs per device (PaLM 6N + attention).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from model import pipeline, sharding
  from model.config import ModelConfig
  from train import optim, state as state_lib, step as step_lib, trainer

  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  t = cfg.train
  mesh, rules = sharding.mesh_from_config(cfg.mesh, devices)
  pipe = pipeline.PipelineConfig.from_config(cfg.get('pipeline'), mesh.shape['pipeline'])
  trainer.check_config(cfg, model_cfg, mesh, rules, pipe)  # Clear errors before compiling.

  tx, schedule = optim.make_optimizer(t, t.steps, model_cfg)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, t.get('trainable', ''))
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  batch = jax.ShapeDtypeStruct((t.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=batch_sh)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=t.grad_accum,
                                          z_loss=t.z_loss, trainable_mask=spec.trainable_mask),
                 in_shardings=(spec.state_shardings, batch_sh),
                 out_shardings=(spec.state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
  with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipe):
    compiled = step.lower(spec.abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = mesh.devices.size
  out = dict(
      devices=n, platform=mesh.devices.flat[0].platform, device_kind=mesh.devices.flat[0].device_kind,
      mesh={a: s for a, s in mesh.shape.items()},
      params=_bytes_per_device(spec.abstract_state['params']),
      opt_state=_bytes_per_device(spec.abstract_state['opt_state']),
      param_count=model_cfg.param_count(),
      flops=float(cost.get('flops', float('nan'))) if cost else float('nan'),
      model_flops=model_cfg.flops_per_token(cfg.data.seq_len) * t.batch_size * cfg.data.seq_len / n,
      bubble_fraction=pipe.bubble_fraction if pipe.enabled else 0.0,
      attention_impl=model_cfg.attention_impl, seq_len=cfg.data.seq_len,
      batch_per_device=t.batch_size / n)
  for k in ('argument', 'output', 'alias', 'temp', 'generated_code'):
    out[k] = int(getattr(mem, f'{k}_size_in_bytes', 0)) if mem is not None else -1
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def analyze_seq_lens(cfg, seq_lens, devices=None) -> list[dict]:
  """`analyze` at each training length T (config.data.seq_len = T, config.model.max_seq_len
  raised to T where needed): how activation/temporary memory grows with T for the config's
  attention_impl ('flash': linearly; 'xla' materialises T x T logits: quadratically)."""
  rows = []
  for t in seq_lens:
    c = cfg.copy_and_resolve_references()
    c.data.seq_len = int(t)
    c.model.max_seq_len = max(c.model.max_seq_len, int(t))
    rows.append(analyze(c, devices))
  return rows


def seq_len_report(rows: list[dict]) -> str:
  """A table of per-device temp and peak bytes by sequence length (from `analyze_seq_lens`)."""
  r0 = rows[0]
  lines = [f'attention_impl={r0["attention_impl"]!r}, {r0["devices"]} x {r0["device_kind"]} '
           f'({r0["platform"]}), {r0["batch_per_device"]:g} rows per device; per device:',
           f'{"seq_len":>8} {"temp":>14} {"peak":>14} {"temp/token":>12} {"temp x":>7} '
           f'{"T x":>5}']
  for r in rows:
    lines.append(f'{r["seq_len"]:>8} {_size(r["temp"])} {_size(r["peak"])} '
                 f'{r["temp"] / r["seq_len"] / 1024:>8.1f} KiB {r["temp"] / r0["temp"]:>7.1f} '
                 f'{r["seq_len"] / r0["seq_len"]:>5g}')
  lines.append('temp = activations, gradients and workspace of one training step; temp x grows '
               'like T x when attention memory is linear in T, like (T x)^2 when quadratic.')
  if r0['platform'] == 'cpu':
    lines.append("note: XLA:CPU's buffer assignment (an estimate of XLA:TPU's).")
  return '\n'.join(lines)


def _size(b: float) -> str:
  return f'{b / GiB:10.3f} GiB' if abs(b) >= GiB / 4 else f'{b / 1024 ** 2:10.3f} MiB'


def report(r: dict) -> str:
  g = _size
  mesh = ' x '.join(f'{a}={s}' for a, s in r['mesh'].items() if s > 1) or 'one device'
  lines = [
      f'target: {r["devices"]} x {r["device_kind"]} ({r["platform"]}), mesh {mesh}',
      f'model: {r["param_count"] / 1e9:.3f}B parameters',
      'per device:',
      f'  params          {g(r["params"])}   (from the shardings: exact)',
      f'  optimizer state {g(r["opt_state"])}   (Adam mu, nu: exact)',
      f'  arguments       {g(r["argument"])}   (compiled: state + batch)',
      f'  outputs         {g(r["output"])}   (aliased with donated inputs: {g(r["alias"]).strip()})',
      f'  temp            {g(r["temp"])}   (activations, gradients, workspace)',
      f'  peak estimate   {g(r["peak"])}   (arguments + outputs - aliased + temp)',
      f'  step FLOPs      {r["flops"]:.3e}   (compiled cost analysis, which counts a scanned '
      f'layer once)',
      f'  model FLOPs     {r["model_flops"]:.3e}   (PaLM 6N + 12LHQT per token, all layers)',
  ]
  if r['bubble_fraction']:
    lines.append(f'pipeline bubble fraction {r["bubble_fraction"]:.3f}')
  if r['platform'] == 'cpu':
    lines.append('note: compiled by XLA:CPU for simulated devices. params/optimizer bytes are exact; '
                 'temp bytes and FLOPs are XLA:CPU\'s (different fusion, layouts and bf16 handling '
                 'from XLA:TPU, collectives not costed): an estimate. --topology=... with libtpu '
                 'installed gives XLA:TPU\'s own figures.')
  return '\n'.join(lines)


def main(argv, fl: dict):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # Quiets libtpu's compile-only init.
  import jax
  if fl['topology'].value:
    devices = tpu_devices(fl['topology'].value)
  else:
    # Before the backend starts: the simulated device count is fixed at first use, and an
    # inherited --xla_force_host_platform_device_count would override --devices.
    os.environ['XLA_FLAGS'] = ' '.join(
        x for x in os.environ.get('XLA_FLAGS', '').split()
        if not x.startswith('--xla_force_host_platform_device_count'))
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', fl['devices'].value)
    devices = jax.devices()
    if len(devices) != fl['devices'].value:
      raise ValueError(f'asked for --devices={fl["devices"].value} simulated devices, the CPU '
                       f'backend has {len(devices)}')
  if fl['seq_lens'].value:
    print(seq_len_report(analyze_seq_lens(fl['config'].value, fl['seq_lens'].value, devices)))
  else:
    print(report(analyze(fl['config'].value, devices)))


if __name__ == '__main__':
  from launch import errors
  _FLAGS = _define_flags()
  errors.run(lambda argv: main(argv, _FLAGS))
