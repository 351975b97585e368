"""Generate text from a workdir's latest (or a given) checkpoint.

  python -m launch.sample --workdir=/tmp/tiny --prompt='def main(' --temperature=0.8 --top_p=0.95
"""
from __future__ import annotations

from absl import flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', None, 'Prompt text (default: the config\'s sample.prompt).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate.')
_NUM = flags.DEFINE_integer('num_samples', None, 'Samples to draw.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, '0 = off.')
_TOP_P = flags.DEFINE_float('top_p', None, '1.0 = off.')
_SEED = flags.DEFINE_integer('seed', None, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  from launch.workdir import load_config, sample_kwargs, sample_workdir
  from train import config_schema
  cfg = load_config(_WORKDIR.value)
  kw = sample_kwargs(cfg.sample)
  flagged = []
  for name, flag in (('prompt', _PROMPT), ('max_new_tokens', _MAX_NEW), ('num_samples', _NUM),
                     ('temperature', _TEMPERATURE), ('top_k', _TOP_K), ('top_p', _TOP_P),
                     ('seed', _SEED)):
    if flag.value is not None:
      kw[name] = flag.value
      flagged.append(name)
  # Before loading anything: refused values are named as the flag (--top_p) that gave them.
  config_schema.validate_sample(kw, flags=flagged)
  for text in sample_workdir(_WORKDIR.value, step=_STEP.value, **kw):
    print(text)
    print('-' * 40)


if __name__ == '__main__':
  from launch import errors
  errors.run(main)
