"""Train from a config file, then print samples.

  python -m launch.main --config=configs/tiny.py --workdir=/tmp/tiny \
      [--config.train.steps=100 --config.model.num_layers=2 ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from launch import errors  # The CLI's error boundary (imports no jax).

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.')
flags.mark_flag_as_required('config')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, tokenizer.',
                               required=True)
_SAMPLE = flags.DEFINE_bool('sample', True, 'Print config.sample.num_samples samples after training.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-host jax.distributed.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index in a multi-host run.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'flags', ['flags', 'auto'],
    "'flags': call jax.distributed.initialize only when --coordinator_address/--num_processes are "
    "given; 'auto': always call it and let JAX detect the cluster (Cloud TPU VM slices, SLURM).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  cfg = _CONFIG.value
  is_sweep = 'sweep' in cfg   # A config file that failed to load raises here, before any work.
  workdir = errors.check_workdir(_WORKDIR.value)
  import jax
  if _DISTRIBUTED.value == 'auto' or _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from launch import workdir as workdir_lib
  from train import trainer

  log = print if jax.process_index() == 0 else (lambda *_: None)  # Log once per job.
  if is_sweep:  # configs/sweeps/*: the whole sweep, or one point of it (launch/sweep.py).
    from launch import sweep
    sweep.run_from_launcher(cfg, workdir, log=log)
    return
  result = trainer.train(cfg, workdir, log=log)
  if result.interrupted or result.step < cfg.train.steps:
    return  # SIGTERM or a first Ctrl-C: the trainer saved and said so; exit now, no samples.
  if _SAMPLE.value and cfg.sample.num_samples > 0 and jax.process_index() == 0:
    print(f'\n--- {cfg.sample.num_samples} samples from step {result.step} '
          f'(prompt {cfg.sample.prompt!r}) ---')
    for text in workdir_lib.sample_workdir(workdir, **workdir_lib.sample_kwargs(cfg.sample)):
      print(text)
      print('-' * 40)


if __name__ == '__main__':
  errors.run(main)
