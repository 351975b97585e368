"""The public way in from outside the trainer: a workdir's (or an imported checkpoint's) model as
logits and log-probabilities, on the devices available.

    scorer = Scorer.load('runs/tiny')                          # latest checkpoint
    logits_BTV = scorer.logits(tokens_BT)                      # float32 [B, T, V]
    scorer.loglikelihood([('def add(a, b):', '\n    return a + b')])
        # -> [(sum of log p(continuation tokens | prompt), whether greedy decoding gives them)]

`load_params` is also how a frozen second model (a DPO reference, a distillation teacher) is
loaded beside the trained one: restored straight onto shardings from the same logical rules.
Evaluation (log-likelihood tasks, lm-eval) and reward scoring build on `loglikelihood`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding
from model.config import ModelConfig
from train import checkpoint_stream, paths, state as state_lib


def load_params(workdir: str, mesh: Mesh | None = None, rules=None, step: int | None = None):
  """(model_cfg, graphdef, params, record) of `workdir`'s checkpoint (latest or `step`), only the
  parameters, restored sharded over `mesh` (default: data parallel over every device) by
  `rules` (default: the workdir's own)."""
  import json
  import ml_collections
  cfg_path = paths.join(workdir, 'config.json')
  if not paths.exists(cfg_path):
    raise FileNotFoundError(f'{cfg_path} not found: expected a palmax workdir (a training run or '
                            'the --dst of launch.convert --from=hf)')
  cfg = ml_collections.ConfigDict(json.loads(paths.read_bytes(cfg_path)))
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  mesh = mesh or sharding.make_mesh({'data': jax.device_count()}, jax.devices())
  rules = rules or sharding.check_rules(cfg.mesh.rules)
  from train import peft_run
  graphdef, abstract, shardings = state_lib.param_shardings(model_cfg, mesh, rules,
                                                            peft_run.config_of(cfg))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  try:
    if peft_run.BASE_KEY in checkpoint_stream.read_record(workdir, step):   # Adapters only.
      params, record = peft_run.restore_adapter_only(workdir, cfg, model_cfg, abstract, shardings,
                                                     rules, step)
    else:
      params, record = checkpoint_stream.restore_params(workdir, abstract, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}: train first') from None
  checkpoint_stream.check_model(record, model_cfg, workdir)
  return model_cfg, graphdef, params, record


@dataclasses.dataclass
class Scorer:
  """A loaded model with a jitted forward; `tokenizer` is None when the workdir has none (then
  pass token ids, not text). `virtual_tokens` ids past the vocabulary are valid inputs (a soft
  prompt's, model/peft/prompt.py)."""
  model_cfg: ModelConfig
  graphdef: Any
  params: Any
  mesh: Mesh
  tokenizer: Any = None
  virtual_tokens: int = 0

  @classmethod
  def load(cls, workdir: str, step: int | None = None, mesh: Mesh | None = None) -> 'Scorer':
    from train.tokenizer import load_workdir_tokenizer
    mesh = mesh or sharding.make_mesh({'data': jax.device_count()}, jax.devices())
    model_cfg, graphdef, params, record = load_params(workdir, mesh, step=step)
    try:
      tokenizer = load_workdir_tokenizer(workdir)
    except (OSError, ValueError):
      tokenizer = None   # An imported checkpoint saved without one: token ids still work.
    if tokenizer is not None:
      from launch.workdir import check_tokenizer
      check_tokenizer(record, tokenizer, workdir)
    return cls(model_cfg, graphdef, params, mesh, tokenizer)

  def __post_init__(self):
    rows = NamedSharding(self.mesh, P(self.mesh.axis_names))
    self._forward = jax.jit(
        lambda params, tokens_BT: nnx.merge(self.graphdef, params).forward(tokens_BT)[0].astype(
            jnp.float32),
        in_shardings=(None, rows))
    self._rows = self.mesh.size

  def logits(self, tokens_BT) -> np.ndarray:
    """float32 [B, T, V] for int token ids [B, T] (rows padded to the device count inside)."""
    tokens_BT = np.asarray(tokens_BT, np.int32)
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
      raise ValueError(f'tokens must be [batch, length] with length >= 1, got shape {tokens_BT.shape}')
    if tokens_BT.shape[1] > self.model_cfg.max_seq_len:
      raise ValueError(f'{tokens_BT.shape[1]} tokens exceed the context '
                       f'config.model.max_seq_len={self.model_cfg.max_seq_len}')
    top = self.model_cfg.vocab_size + self.virtual_tokens
    if tokens_BT.min() < 0 or tokens_BT.max() >= top:
      raise ValueError(f'token ids must be in [0, {top})')
    b = tokens_BT.shape[0]
    pad = -b % self._rows
    padded = np.concatenate([tokens_BT, np.zeros((pad, tokens_BT.shape[1]), np.int32)])
    return np.asarray(self._forward(self.params, padded))[:b]

  def _ids(self, text_or_ids, prompt: bool) -> list[int]:
    if isinstance(text_or_ids, str):
      if self.tokenizer is None:
        raise ValueError('this workdir has no tokenizer: pass token ids instead of text')
      ids = self.tokenizer.encode(text_or_ids)
      return [self.tokenizer.doc_start_id] + ids if prompt else ids
    return [int(i) for i in text_or_ids]

  def loglikelihood(self, pairs: Sequence[tuple[Any, Any]], batch_size: int = 8,
                    bucket: bool = False) -> list[tuple[float, bool]]:
    """For each (prompt, continuation), as text or token ids: (sum over the continuation's tokens
    of log p(token | everything before it), whether each is also the argmax). A text prompt opens
    on the tokenizer's document start, as in training; the two are tokenized separately, as
    lm-evaluation-harness does. `bucket` pads every call to `batch_size` rows and a power-of-two
    length, so many items of varied lengths compile a few shapes (the rows are independent)."""
    items = []
    for prompt, continuation in pairs:
      ctx, cont = self._ids(prompt, True), self._ids(continuation, False)
      if not ctx or not cont:
        raise ValueError('each prompt and continuation needs at least one token')
      if len(ctx) + len(cont) - 1 > self.model_cfg.max_seq_len:
        raise ValueError(f'a prompt of {len(ctx)} tokens and a continuation of {len(cont)} exceed '
                         f'the context config.model.max_seq_len={self.model_cfg.max_seq_len}')
      items.append((ctx, cont))
    out = [None] * len(items)
    # Similar lengths together: fewer padded positions per call.
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    for i in range(0, len(order), batch_size):
      chunk = [items[j] for j in order[i:i + batch_size]]
      length = max(len(c) + len(k) for c, k in chunk) - 1
      rows = len(chunk)
      if bucket:
        length = min(max(16, 1 << (length - 1).bit_length()), self.model_cfg.max_seq_len)
        rows = batch_size
      tokens = np.zeros((rows, length), np.int32)   # Right-padded: causal, so harmless.
      for r, (ctx, cont) in enumerate(chunk):
        seq = (ctx + cont)[:-1]
        tokens[r, :len(seq)] = seq
      logp_BTV = jax.nn.log_softmax(jnp.asarray(self.logits(tokens)), axis=-1)
      for r, (ctx, cont) in enumerate(chunk):
        pos = np.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        rows_LV = np.asarray(logp_BTV[r, pos])
        out[order[i + r]] = (float(rows_LV[np.arange(len(cont)), cont].sum()),
                             bool((rows_LV.argmax(-1) == np.asarray(cont)).all()))
    return out
