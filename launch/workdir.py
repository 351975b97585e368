"""Restoring a trained workdir for inference: its config, parameters and tokenizer, and sampling.

Shared by `launch.sample` (CLI), `launch.main` (samples after training) and the Colab notebook.
"""
from __future__ import annotations

import json


def load_config(workdir: str):
  import ml_collections
  from train import paths
  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be a palmax training workdir')
  return ml_collections.ConfigDict(json.loads(paths.read_bytes(path)))


def load_model(workdir: str, step: int | None = None, on_config_mesh: bool = False):
  """(cfg, model_cfg, graphdef, params, tokenizer) from a workdir, on a 1-device mesh, or with
  `on_config_mesh` on the mesh and rules of the workdir's config over every device. Only the
  parameters are read (not the optimizer's moments, twice their size)."""
  import jax
  from model import sharding
  from train.scoring import load_params
  from train.tokenizer import load_workdir_tokenizer

  cfg = load_config(workdir)
  rules = None
  if on_config_mesh:
    mesh, rules = sharding.mesh_from_config(cfg.mesh.to_dict(), jax.devices())
  else:
    mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  model_cfg, graphdef, params, record = load_params(workdir, mesh, rules, step=step)
  tokenizer = load_workdir_tokenizer(workdir)   # palmax's own, or a converted checkpoint's.
  check_tokenizer(record, tokenizer, workdir)
  return cfg, model_cfg, graphdef, params, tokenizer


def check_tokenizer(record: dict, tokenizer, workdir: str) -> None:
  """Refuses a tokenizer other than the one the checkpoint was trained with: decoding with
  another one produces fluent-looking garbage without a word."""
  from train.checkpoint import CheckpointMismatchError
  want = (record.get('corpus') or {}).get('tokenizer_sha256')
  if want and tokenizer.digest != want:
    raise CheckpointMismatchError(
        f"{workdir}'s tokenizer (sha256 {tokenizer.digest[:12]}) is not the one its checkpoint was "
        f'trained with (sha256 {want[:12]}); restore the original tokenizer files')


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

  from model.inference.healing import TokenHealer
  _, model_cfg, graphdef, params, tok = load_model(workdir, step)
  # A prompt opens like a training document (`doc_start_id`: after EOS in palmax's packing, on
  # BOS in a converted HF checkpoint). A prompt ending in whitespace is healed: the tokenizer
  # merges a newline with its indentation and the text after it, so its last token is backed
  # off and the first sampled token must extend it (model/inference/healing.py).
  healed = TokenHealer(tok, model_cfg.vocab_size).heal([tok.doc_start_id] + tok.encode(prompt))
  ids = healed.ids
  decode.check_prompt(len(ids), max_new_tokens, model_cfg)
  prompt_BP = jnp.asarray([ids] * num_samples, jnp.int32)
  new_BN = decode.generate(graphdef, params, prompt_BP, jax.random.key(seed),
                           max_new_tokens=max_new_tokens, temperature=float(temperature),
                           top_k=int(top_k), top_p=float(top_p), eos_id=tok.eos_id,
                           vocab_limit=tok.vocab_size, first_allowed=healed.allowed_V)
  out = []
  for row in jax.device_get(new_BN).tolist():
    if tok.eos_id in row:
      row = row[:row.index(tok.eos_id)]
    text = tok.decode(row)
    out.append(prompt + text.removeprefix(healed.removed_text))
  return out


def load_completer(workdir: str, step: int | None = None, serve_overrides: dict | None = None,
                   on_config_mesh: bool = False):
  """A workdir's model behind a serving engine: (Completer, Engine). Serving settings are the
  workdir config's `serve` section (older workdirs: the defaults) with `serve_overrides`; the
  chat template is the checkpoint's own (an imported HF tokenizer_config.json) if it has one."""
  import dataclasses
  import os
  from model.inference.completion import Completer
  from model.inference.engine import Engine
  from model import sharding
  from model.inference.serve_config import ServeConfig
  from train import paths
  from train.sft_data import chat_format

  cfg, model_cfg, graphdef, params, tok = load_model(workdir, step, on_config_mesh)
  serve = dict(cfg.get('serve', {}) or {})
  serve.update({k: v for k, v in (serve_overrides or {}).items() if v is not None})
  serve_cfg = ServeConfig.from_dict(serve)
  fields = {f.name for f in dataclasses.fields(model_cfg)}
  namespace = json.dumps({k: getattr(model_cfg, k) for k in sorted(fields)}, default=str)
  namespace += getattr(tok, 'digest', '') + os.path.abspath(workdir) + str(step)
  rules = (sharding.check_rules(sharding.resolve_preset(cfg.mesh.to_dict())[1]) if on_config_mesh
           else None)
  from train.peft_run import prefix_ids
  prefix = prefix_ids(cfg, model_cfg)
  engine = Engine(graphdef, params, model_cfg, serve_cfg, eos_id=tok.eos_id,
                  vocab_limit=tok.vocab_size, namespace=namespace, rules=rules,
                  virtual_tokens=len(prefix))
  hf_dir = paths.join(workdir, 'hf_tokenizer')
  chat = chat_format(tok, hf_dir if paths.isdir(hf_dir) else None)
  return Completer(engine, tok, chat=chat, prefix_ids=prefix), engine

