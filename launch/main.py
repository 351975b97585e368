"""Train from a config file, then print samples.

  python -m launch.main --config=configs/tiny.py --workdir=/tmp/tiny \
      [--config.train.steps=100 --config.model.num_layers=2 ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

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

# Errors that are the user's to fix: print the message, not a traceback.
from launch.errors import USER_ERRORS, fail  # noqa: E402


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  import jax
  if _DISTRIBUTED.value == 'auto' or _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from launch import workdir as workdir_lib
  from train import trainer

  cfg = _CONFIG.value
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  try:
    log = print if jax.process_index() == 0 else (lambda *_: None)  # Log once per job.
    if 'sweep' in cfg:  # configs/sweeps/*: the whole sweep, or one point of it (launch/sweep.py).
      from launch import sweep
      sweep.run_from_launcher(cfg, workdir, log=log)
      return
    result = trainer.train(cfg, workdir, log=log)
    if _SAMPLE.value and cfg.sample.num_samples > 0 and jax.process_index() == 0:
      print(f'\n--- {cfg.sample.num_samples} samples from step {result.step} '
            f'(prompt {cfg.sample.prompt!r}) ---')
      for text in workdir_lib.sample_workdir(workdir, **workdir_lib.sample_kwargs(cfg.sample)):
        print(text)
        print('-' * 40)
  except USER_ERRORS as e:
    fail(e)


if __name__ == '__main__':
  from launch.errors import parse_flags
  app.run(main, flags_parser=parse_flags)
