"""Generate text from a workdir's latest (or a given) checkpoint.

  python -m launch.sample --workdir=/tmp/tiny --prompt='def main(' --temperature=0.8 --top_p=0.95
"""
from __future__ import annotations

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', None, 'Prompt text (default: the config\'s sample.prompt).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate.')
_NUM = flags.DEFINE_integer('num_samples', None, 'Samples to draw.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, '0 = off.')
_TOP_P = flags.DEFINE_float('top_p', None, '1.0 = off.')
_SEED = flags.DEFINE_integer('seed', None, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be a palmax training workdir')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, step: int | None = None):
  """(cfg, graphdef, params, tokenizer) from a workdir, on a 1-device mesh."""
  import jax
  from model import sharding
  from model.config import ModelConfig
  from train import checkpoint as ckpt_lib, optim, state as state_lib
  from train.tokenizer import Tokenizer

  cfg = load_config(workdir)
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  tx, _ = optim.make_optimizer(cfg.train, cfg.train.steps)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, sharding.check_rules(cfg.mesh.rules))
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: train first')
  state, _ = ckpt.restore(spec.abstract_state, step=step, expect={'model': model_cfg.__dict__})
  ckpt.close()
  tokenizer = Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  return cfg, model_cfg, spec.graphdef, state['params'], tokenizer


def sample_kwargs(sample_cfg) -> dict:
  return {k: sample_cfg[k] for k in ('prompt', 'max_new_tokens', 'num_samples', 'temperature',
                                     'top_k', 'top_p', 'seed')}


def sample_workdir(workdir: str, *, prompt: str, max_new_tokens: int, num_samples: int,
                   temperature: float, top_k: int, top_p: float, seed: int,
                   step: int | None = None) -> list[str]:
  """Returns `num_samples` strings: the prompt followed by its continuation (cut at EOS)."""
  import jax
  import jax.numpy as jnp
  from model import decode

  _, model_cfg, graphdef, params, tok = load_model(workdir, step)
  ids = tok.encode(prompt)
  decode.check_prompt(len(ids), max_new_tokens, model_cfg)
  prompt_BP = jnp.asarray([ids] * num_samples, jnp.int32)
  new_BN = decode.generate(graphdef, params, prompt_BP, jax.random.key(seed),
                           max_new_tokens=max_new_tokens, temperature=float(temperature),
                           top_k=int(top_k), top_p=float(top_p), eos_id=tok.eos_id)
  out = []
  for row in jax.device_get(new_BN).tolist():
    if tok.eos_id in row:
      row = row[:row.index(tok.eos_id)]
    out.append(prompt + tok.decode(row))
  return out


def main(argv):
  del argv
  from launch.errors import USER_ERRORS, fail
  try:
    cfg = load_config(_WORKDIR.value)
    kw = sample_kwargs(cfg.sample)
    for name, flag in (('prompt', _PROMPT), ('max_new_tokens', _MAX_NEW), ('num_samples', _NUM),
                       ('temperature', _TEMPERATURE), ('top_k', _TOP_K), ('top_p', _TOP_P),
                       ('seed', _SEED)):
      if flag.value is not None:
        kw[name] = flag.value
    for text in sample_workdir(_WORKDIR.value, step=_STEP.value, **kw):
      print(text)
      print('-' * 40)
  except USER_ERRORS as e:
    fail(e)


if __name__ == '__main__':
  app.run(main)
