"""Compile the train step for a mesh you do not have and print per-device memory and FLOPs.

  python -m launch.memory --config=configs/palm_8b.py --devices=256 [--config.mesh.fsdp=-1 ...]
  python -m launch.memory --config=configs/palm_8b.py --topology=v5p:4x4x8   # v5p-256, needs libtpu
  python -m launch.memory --config=configs/tiny.py --devices=1 --seq_lens=2048,8192,32768 \
      --config.model.attention_impl=flash   # temp bytes by training length: linear vs quadratic
  python -m launch.memory --config=configs/tiny.py --devices=1 --peft_table
      # full fine-tuning vs LoRA, QLoRA (int8/int4/nf4), adapters, soft prompts: trainable
      # parameters, parameter and optimizer bytes (abstract state only; --peft_compile compiles)

Nothing is allocated: the train state is abstract (ShapeDtypeStructs carrying their shardings),
and the jitted step is lowered and compiled ahead of time. Parameter and optimizer bytes per
device come from the shardings (exact on any backend); argument/output/temp bytes and FLOPs come
from the compiled executable's memory and cost analysis. `config.peft` (model/peft/methods.py)
is applied as the trainer applies it: the PEFT layout, what trains (trainable vs frozen parameter
bytes) and Adam moments for the trainable parameters only.

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
                                      'bytes, e.g. 2048,8192,32768.'),
           peft_table=flags.DEFINE_bool('peft_table', False, 'Instead of one analysis, a table of '
                                        'full fine-tuning against each PEFT method (LoRA, QLoRA '
                                        'int8/int4/nf4, adapters, soft prompts) on this config: '
                                        'trainable parameters, parameter and optimizer bytes.'),
           peft_compile=flags.DEFINE_bool('peft_compile', False, 'With --peft_table: also compile '
                                          'each row\'s train step for its temp and peak bytes '
                                          '(slow; off: the abstract state alone).'))
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


def _setup(cfg, devices=None) -> dict:
  """What both `analyze` and `peft_table` need: the model config, mesh, optimizer and the
  abstract train state (with cfg's PEFT applied, as train/run.py builds it). Config errors
  (mesh, pipeline, PEFT) are raised here, before anything compiles."""
  from model import pipeline, sharding
  from model.config import ModelConfig
  from train import config_schema, optim, peft_run, state as state_lib, trainer

  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  t = cfg.train
  mesh, rules = sharding.mesh_from_config(cfg.mesh, devices)
  pipe = pipeline.PipelineConfig.from_config(cfg.get('pipeline'), mesh.shape['pipeline'])
  trainer.check_config(cfg, model_cfg, mesh, rules, pipe)  # Clear errors before compiling.
  peft = peft_run.config_of(cfg)
  if peft.active:   # The trainer's own PEFT checks (valid fields, AdamW, no pipeline).
    config_schema._check_peft(cfg)   # pylint: disable=protected-access
  tx, schedule = optim.make_optimizer(t, t.steps, model_cfg)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, t.get('trainable', ''), peft)
  return dict(model_cfg=model_cfg, mesh=mesh, rules=rules, pipe=pipe, peft=peft, tx=tx,
              schedule=schedule, spec=spec)


def _logical_count(abstract_params, model_cfg, peft) -> int:
  """Parameters in the state, a quantized weight counted by its weight's elements (not by its
  packed codes and scales)."""
  n = sum(math.prod(a.shape) for a in _leaves(abstract_params))
  if peft is not None and peft.quant:
    from model import quant
    from model.peft import methods as peft_lib
    for q in quant.quant_sites(peft_lib.abstract_model(model_cfg, peft)).values():
      n += math.prod(q.shape) - math.prod(q.codes.shape) - math.prod(q.scales.shape)
  return n


def _state_figures(s: dict) -> dict:
  """Parameter counts and per-device bytes of `_setup`'s abstract state (exact, no compiling):
  params = params_trainable + params_frozen; opt_state covers the trainable parameters only."""
  from train import trainable
  spec, peft = s['spec'], s['peft']
  params = spec.abstract_state['params']
  train_tree, frozen_tree = trainable.split(params, spec.trainable_mask)
  mesh = s['mesh']
  return dict(
      devices=mesh.devices.size, platform=mesh.devices.flat[0].platform,
      device_kind=mesh.devices.flat[0].device_kind, mesh={a: n for a, n in mesh.shape.items()},
      peft_method=peft.method, peft_quant=peft.quant,
      optimizer=s.get('optimizer', ''),
      params=_bytes_per_device(params),
      params_trainable=_bytes_per_device(train_tree),
      params_frozen=_bytes_per_device(frozen_tree),
      opt_state=_bytes_per_device(spec.abstract_state['opt_state']),
      trainable_params=sum(math.prod(a.shape) for a in _leaves(train_tree)),
      total_params=_logical_count(params, s['model_cfg'], peft))


def analyze(cfg, devices=None) -> dict:
  """Compiles cfg's train step for a mesh over `devices` (default: all) without allocating it.

  Returns bytes per device: params (= params_trainable + params_frozen under config.peft or
  config.train.trainable), opt_state, argument/output/alias/temp from the compiled memory
  analysis, peak (= argument + output - alias + temp) and flops (per device, from the compiled
  cost analysis) next to the model FLOPs per device (PaLM 6N + attention); trainable_params of
  total_params (all of the state's parameters, PEFT's included, a quantized weight counted by
  its elements); param_count (the base model's, config.model).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from model import pipeline, sharding
  from train import step as step_lib

  s = _setup(cfg, devices)
  s['optimizer'] = cfg.train.get('optimizer', 'adamw')
  model_cfg, mesh, rules, pipe, spec, tx = (s[k] for k in ('model_cfg', 'mesh', 'rules', 'pipe',
                                                           'spec', 'tx'))
  t = cfg.train
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  batch = jax.ShapeDtypeStruct((t.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=batch_sh)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, s['schedule'], grad_accum=t.grad_accum,
                                          z_loss=t.z_loss, trainable_mask=spec.trainable_mask),
                 in_shardings=(spec.state_shardings, batch_sh),
                 out_shardings=(spec.state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
  with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipe):
    compiled = step.lower(spec.abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = mesh.devices.size
  out = _state_figures(s)
  out.update(
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


# The --peft_table rows: (name, config.peft.method, config.peft.quant); 'full' first (the ratios'
# reference). Every other field of config.peft (rank, targets, group size, ...) is the config's.
PEFT_ROWS = (('full', '', ''), ('lora', 'lora', ''), ('lora+int8', 'lora', 'int8'),
             ('lora+int4', 'lora', 'int4'), ('lora+nf4 (QLoRA)', 'lora', 'nf4'),
             ('adapter', 'adapter', ''), ('prompt', 'prompt', ''))


def _with_peft(cfg, method: str, quant: str):
  """A copy of cfg with config.peft.method/quant set and config.train.trainable cleared (the row
  trains what its method trains); a PEFT method trains with AdamW (the trainer refuses Muon with
  PEFT: train/config_schema.py), so the copy's optimizer is adamw."""
  import dataclasses

  import ml_collections

  from model.peft.methods import PeftConfig
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    if 'peft' not in c:   # A config from before config.peft existed.
      c.peft = ml_collections.ConfigDict(dataclasses.asdict(PeftConfig()))
    c.peft.method, c.peft.quant = method, quant
    if 'trainable' in c.train:   # Each row trains what its method trains ('' = everything).
      c.train.trainable = ''
    if method:
      c.train.optimizer = 'adamw'
  return c


def peft_table(cfg, devices=None, compile: bool = False) -> list[dict]:  # pylint: disable=redefined-builtin
  """Full fine-tuning against each PEFT method (`PEFT_ROWS`) on cfg's model and mesh: one dict
  per row with `_state_figures`' keys (trainable_params, total_params; params, params_trainable,
  params_frozen, opt_state: bytes per device) plus name, param_opt (params + opt_state) and
  ratio (full's param_opt over this row's). From the abstract state alone, unless `compile`:
  then each row is `analyze`d (temp and peak bytes too; slow). A PEFT row the config cannot
  build (a pipelined mesh, a quantization group that does not divide a weight, model/quant.py
  missing) has `error` (one line) instead of figures; the full row's errors are raised."""
  rows = []
  for name, method, quant in PEFT_ROWS:
    c = _with_peft(cfg, method, quant)
    try:
      if quant:
        _import_quant()
      if compile:
        r = analyze(c, devices)
      else:
        s = _setup(c, devices)
        s['optimizer'] = c.train.get('optimizer', 'adamw')
        r = _state_figures(s)
    except (ValueError, ImportError) as e:   # ConfigError, ShardingError, PipelineError: ValueErrors.
      if not method:
        raise
      rows.append(dict(name=name, peft_method=method, peft_quant=quant,
                       error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'))
      continue
    r['name'] = name
    r['param_opt'] = r['params'] + r['opt_state']
    rows.append(r)
  full = rows[0]['param_opt']
  for r in rows:
    if 'error' not in r:
      r['ratio'] = full / r['param_opt'] if r['param_opt'] else float('inf')
  return rows


def _import_quant():
  """model/quant.py, or ImportError naming why not (a module that fails to import at all)."""
  try:
    from model import quant
  except ImportError:
    raise
  except Exception as e:   # A half-written module: its row says so, the table still prints.
    raise ImportError(f'model/quant.py does not import ({type(e).__name__}: {e})') from e
  return quant


def _peft_settings(cfg) -> str:
  from train import peft_run
  p = peft_run.config_of(cfg)
  return (f'lora rank {p.lora_rank} on {p.lora_targets}; int8/int4/nf4 quantize '
          f'{p.quant_targets} (4-bit groups of {p.quant_group_size}); adapter dim '
          f'{p.adapter_dim} after {p.adapter_targets}; prompt {p.prompt_tokens} tokens')


def peft_report(rows: list[dict], cfg=None) -> str:
  """`peft_table`'s rows as a table (bytes per device); `cfg` adds a line naming the PEFT
  settings (config.peft's rank, targets, ...)."""
  r0 = rows[0]
  mesh = ' x '.join(f'{a}={s}' for a, s in r0['mesh'].items() if s > 1) or 'one device'
  compiled = 'peak' in r0
  g = lambda b: _size(b).strip()
  lines = [f'full fine-tuning vs PEFT on {r0["devices"]} x {r0["device_kind"]} '
           f'({r0["platform"]}), mesh {mesh}; bytes per device (from the shardings: exact):']
  if cfg is not None:
    lines.append(f'  {_peft_settings(cfg)}')
  head = (f'{"method":<17} {"optimizer":<9} {"trainable params":>22} {"params":>12} '
          f'{"optimizer":>12} {"params+opt":>12} {"full/this":>9}')
  if compiled:
    head += f' {"temp":>12} {"peak":>12}'
  lines.append(head)
  for r in rows:
    if 'error' in r:
      lines.append(f'{r["name"]:<17} not built: {r["error"]}')
      continue
    pct = 100 * r['trainable_params'] / max(r['total_params'], 1)
    line = (f'{r["name"]:<17} {r["optimizer"]:<9} {r["trainable_params"]:>13,} ({pct:5.1f}%) '
            f'{g(r["params"]):>12} {g(r["opt_state"]):>12} {g(r["param_opt"]):>12} '
            f'{r["ratio"]:>8.2f}x')
    if compiled:
      line += f' {g(r["temp"]):>12} {g(r["peak"]):>12}'
    lines.append(line)
  lines += ['params: every parameter, frozen (a quantized weight: its codes + float32 scales) '
            'and trainable;',
            'optimizer: the trainable parameters\' state only (AdamW: mu and nu, float32);',
            'trainable %: of all parameters, a quantized weight counted by its elements.']
  if any(r.get('optimizer') not in (None, 'adamw') for r in rows if 'error' not in r):
    lines.append('PEFT rows train with AdamW (the trainer refuses Muon with a PEFT method); '
                 'full uses the config\'s.')
  if compiled and r0['platform'] == 'cpu':
    lines.append("temp/peak: XLA:CPU's buffer assignment (an estimate of XLA:TPU's).")
  return '\n'.join(lines)


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
  peft = ''
  if r['peft_method'] or r['peft_quant']:
    peft = (f' (config.peft: {r["peft_method"] or "no method"}'
            + (f', base quantized {r["peft_quant"]}' if r['peft_quant'] else '') + ')')
  lines = [
      f'target: {r["devices"]} x {r["device_kind"]} ({r["platform"]}), mesh {mesh}',
      f'model: {r["param_count"] / 1e9:.3f}B parameters',
      f'trains {r["trainable_params"]:,} of {r["total_params"]:,} parameters '
      f'({100 * r["trainable_params"] / max(r["total_params"], 1):.2f}%)' + peft,
      'per device:',
      f'  params          {g(r["params"])}   (from the shardings: exact)',
      f'    trainable     {g(r["params_trainable"])}',
      f'    frozen        {g(r["params_frozen"])}' + (' (quantized codes + scales, and the rest)'
                                                        if r['peft_quant'] else ''),
      f'  optimizer state {g(r["opt_state"])}   ({r["optimizer"]}, trainable parameters only: '
      'exact)',
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
  if fl['peft_table'].value:
    cfg = fl['config'].value
    print(peft_report(peft_table(cfg, devices, compile=fl['peft_compile'].value), cfg))
  elif fl['seq_lens'].value:
    print(seq_len_report(analyze_seq_lens(fl['config'].value, fl['seq_lens'].value, devices)))
  else:
    print(report(analyze(fl['config'].value, devices)))


if __name__ == '__main__':
  from launch import errors
  _FLAGS = _define_flags()
  errors.run(lambda argv: main(argv, _FLAGS))
