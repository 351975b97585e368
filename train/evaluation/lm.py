"""What evaluation asks of a model: scores and generations, in batches.

Every evaluator (task harness, autorater, the lm-evaluation-harness adapter) talks to an
`EvalModel`; `PalmaxModel` is the one backed by a palmax workdir (trained or imported from HF):
log-likelihoods from a jitted forward (`train.scoring.Scorer`), generations batched through the
serving engine (`model.inference.engine`, continuous batching on the model's mesh).

    model = PalmaxModel.load('runs/tiny')
    model.loglikelihood([('2 + 2 =', ' 4')])        # -> [(log p, greedy?)]
    model.loglikelihood_rolling(['some text'])       # -> [(sum log p, tokens)]
    model.generate(['Q: 2 + 2?\nA:'], Generation(max_tokens=8, until=('\n',)))  # -> [['4']]
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Generation:
  """How to generate: `until` strings end a response (and are cut from it); `n` samples per
  prompt, with `temperature` (0 = greedy) and a base `seed` (sample i uses seed + i)."""
  max_tokens: int = 64
  until: tuple[str, ...] = ()
  temperature: float = 0.0
  n: int = 1
  seed: int = 0
  heal: bool = True   # Token healing (serving's default); False when the prompt's tokens are
                      # exactly what training saw before a response (SFT's separate encoding).

  def __post_init__(self):
    if self.max_tokens < 1:
      raise ValueError(f'max_tokens must be >= 1, got {self.max_tokens}')
    if self.n < 1:
      raise ValueError(f'n must be >= 1, got {self.n}')
    if not 0.0 <= self.temperature <= 2.0:
      raise ValueError(f'temperature must be in [0, 2], got {self.temperature}')


class EvalModel(Protocol):
  """The evaluation surface of a language model (text in, numbers or text out)."""
  name: str

  def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
    """(sum of log p over every token of the text, number of tokens), any length."""

  def generate(self, prompts: Sequence[str], gen: Generation) -> list[list[str]]:
    """`gen.n` responses per prompt, each cut at the first `gen.until` string."""


def cut_at(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any of `until`."""
  end = len(text)
  for s in until:
    i = text.find(s)
    if s and 0 <= i < end:
      end = i
  return text[:end]


class PalmaxModel:
  """A palmax workdir as an EvalModel. Generation batches every prompt through one engine
  (`serve_overrides` tune it: num_slots, page_size...); scoring pads rows to power-of-two
  lengths so a task compiles a handful of shapes, not one per item."""

  def __init__(self, scorer, completer, engine, name: str = 'palmax'):
    self.scorer, self.completer, self.engine, self.name = scorer, completer, engine, name
    self.tokenizer = scorer.tokenizer
    self._loop = None

  @classmethod
  def load(cls, workdir: str, step: int | None = None, serve_overrides: dict | None = None,
           on_config_mesh: bool = False) -> 'PalmaxModel':
    """`workdir`'s checkpoint on one device, or with `on_config_mesh` sharded by its config's
    mesh and rules over every device (a model too big for one chip; data parallel scoring)."""
    from launch.workdir import load_completer
    from train.scoring import Scorer
    completer, engine = load_completer(workdir, step, serve_overrides, on_config_mesh)
    scorer = Scorer(engine.model_cfg, engine.graphdef, engine.params, engine.mesh,
                    completer.tokenizer, virtual_tokens=engine.virtual_tokens)
    return cls(scorer, completer, engine, name=workdir)

  @classmethod
  def from_params(cls, graphdef, params, model_cfg, tokenizer, serve_overrides: dict | None = None,
                  name: str = 'palmax', prefix_ids=()) -> 'PalmaxModel':
    """Live parameters (the trainer's, on its mesh) as an EvalModel; `set_params` swaps in
    newer ones without recompiling."""
    from model.inference.completion import Completer
    from model.inference.engine import Engine
    from model.inference.serve_config import ServeConfig
    from train.scoring import Scorer
    engine = Engine(graphdef, params, model_cfg, ServeConfig.from_dict(serve_overrides or {}),
                    eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size,
                    namespace=f'{name}/0', virtual_tokens=len(prefix_ids))
    mesh = engine.mesh
    if mesh is None:
      import jax
      from model import sharding
      mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
    scorer = Scorer(model_cfg, graphdef, params, mesh, tokenizer, virtual_tokens=len(prefix_ids))
    return cls(scorer, Completer(engine, tokenizer, prefix_ids=prefix_ids), engine, name=name)

  def set_params(self, params) -> None:
    """New values for the same parameters (same shapes and shardings). The engine's prefix
    cache gets a new namespace: pages computed by the old parameters never match again."""
    if self._loop is not None and self.engine.has_work():
      raise RuntimeError('set_params while generations are running')
    self.scorer.params = self.engine.params = params
    self._version = getattr(self, '_version', 0) + 1
    self.engine.namespace = f'{self.name}/{self._version}'

  @property
  def max_len(self) -> int:
    return self.scorer.model_cfg.max_seq_len

  def close(self) -> None:
    if self._loop is not None:
      self._loop.stop()
      self._loop = None

  # ---- scores -----------------------------------------------------------------------------
  def loglikelihood(self, pairs, batch_size: int = 8):
    """Text contexts open on the document start; one too long for the context keeps its last
    tokens (as lm-evaluation-harness truncates)."""
    tok, room = self.tokenizer, self.max_len + 1
    prefix = self.completer.prefix_ids   # A soft prompt's tokens stay first when cutting.
    ids = []
    for ctx, cont in pairs:
      c = [tok.doc_start_id] + tok.encode(ctx) if isinstance(ctx, str) else list(ctx)
      k = tok.encode(cont) if isinstance(cont, str) else list(cont)
      if len(k) + len(prefix) >= room:
        raise ValueError(f'a continuation of {len(k)} tokens does not fit the context of '
                         f'{self.max_len} tokens')
      ids.append((prefix + c[-(room - len(k) - len(prefix)):], k))
    return self.scorer.loglikelihood(ids, batch_size=batch_size, bucket=True)

  def loglikelihood_rolling(self, texts, batch_size: int = 8):
    """Disjoint windows of at most max_seq_len predicted tokens, each conditioned on as many
    earlier tokens as fit (lm-evaluation-harness's rolling scheme); the first token is predicted
    from the document start, as in training."""
    windows, owner = [], []
    for t, text in enumerate(texts):
      ids = [self.tokenizer.doc_start_id] + self.tokenizer.encode(text)
      prefix = self.completer.prefix_ids
      for ctx, cont in rolling_windows(ids, self.max_len - len(prefix)):
        ctx = prefix + ctx
        windows.append((ctx, cont))
        owner.append(t)
    scores = self.scorer.loglikelihood(windows, batch_size=batch_size, bucket=True)
    total, count = np.zeros(len(texts)), np.zeros(len(texts), int)
    for t, (ctx, cont), (lp, _) in zip(owner, windows, scores):
      total[t] += lp
      count[t] += len(cont)
    return [(float(a), int(b)) for a, b in zip(total, count)]

  # ---- generations ------------------------------------------------------------------------
  def generate(self, prompts, gen: Generation):
    from model.inference.completion import CompletionParams
    from model.inference.loop import EngineLoop
    if self._loop is None:
      self._loop = EngineLoop(self.engine).start()
    room = max(1, self.engine.cfg.max_queue // gen.n)
    params = CompletionParams(max_tokens=gen.max_tokens, temperature=gen.temperature,
                              n=gen.n, seed=gen.seed, stop=tuple(gen.until)[:4], heal=gen.heal)
    out: list[list[str]] = []
    for i in range(0, len(prompts), room):   # Never more in flight than the queue takes.
      started = [self.completer.start(self._fit(p, gen.max_tokens), params)
                 for p in prompts[i:i + room]]
      for c in started:
        out.append([cut_at(ch.text, gen.until) for ch in c.choices()])
    return out

  def _fit(self, prompt: str, max_tokens: int):
    """The prompt's ids, keeping its last tokens when it and the response overflow the context
    (few-shot prompts can be long); text when it fits, so token healing applies."""
    ids = self.completer.encode_prompt(prompt)
    prefix = len(self.completer.prefix_ids)   # A soft prompt's tokens: kept, put back by start.
    room = self.max_len - max_tokens
    if room < 2 + prefix:
      raise ValueError(f'max_tokens={max_tokens} leaves no room for a prompt in the context of '
                       f'{self.max_len} tokens')
    return prompt if len(ids) <= room - 1 else ids[prefix:][-(room - prefix):]


def rolling_windows(ids: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) windows predicting ids[1:] exactly once: continuation lengths
  <= max_len and context + continuation <= max_len + 1 tokens (the last token is only a target)."""
  out, start = [], 1
  while start < len(ids):
    end = min(start + max_len, len(ids))
    lo = max(0, end - 1 - max_len)        # Input ids[lo:end-1] is at most max_len tokens.
    out.append((list(ids[lo:start]), list(ids[start:end])))
    start = end
  return out
