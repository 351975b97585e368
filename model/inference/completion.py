"""Text in, text out on top of the engine: prompts, token healing, stop strings, streaming text
deltas, `n` samples and `best_of` with a scorer, beam search, and chat templates.

`Completer(engine, tokenizer).start(prompt, params, sink)` submits `best_of` (default `n`)
sequences and calls `sink(Delta)` from the engine thread as text arrives; `complete(...)` waits
and returns `Choice`s. Streamed text never shows part of a stop string: the last
(longest stop - 1) characters are held back until they can no longer start one.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Callable

import numpy as np

from model.inference import beam as beam_lib
from model.inference.engine import Engine, Event, GenerationRequest
from model.inference.healing import TokenHealer


class BadRequest(ValueError):
  """A request parameter the server answers with `status` (400 unless said), naming `param`."""

  def __init__(self, message: str, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


def _num(d, name, lo=None, hi=None, integer=False, default=None, lo_open=False):
  v = d.get(name, default)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
    kind = 'an integer' if integer else 'a number'
    raise BadRequest(f'{name} must be {kind}, got {v!r}', name)
  if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
    rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
    raise BadRequest(f'{name}={v} must be in {rng}', name)
  return int(v) if integer else float(v)


@dataclasses.dataclass
class CompletionParams:
  """Per-request settings (OpenAI names; vLLM's extras top_k, min_p, repetition_penalty,
  stop_token_ids, ignore_eos, beam_width, length_penalty; palmax's `heal`)."""
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  n: int = 1
  best_of: int | None = None
  logprobs: int | None = None
  ignore_eos: bool = False
  heal: bool = True
  beam_width: int = 0
  length_penalty: float = 1.0

  @classmethod
  def from_dict(cls, d: dict, *, max_n: int = 16, max_logprobs: int = 20) -> 'CompletionParams':
    """Validates every field, raising BadRequest naming it."""
    p = cls()
    p.max_tokens = _num(d, 'max_tokens', 1, integer=True, default=16)
    p.temperature = _num(d, 'temperature', 0, 2, default=1.0)
    p.top_p = _num(d, 'top_p', 0, 1, default=1.0, lo_open=True)
    p.top_k = _num(d, 'top_k', -1, integer=True, default=0)
    p.top_k = max(p.top_k, 0)  # vLLM's -1 = off.
    p.min_p = _num(d, 'min_p', 0, 1, default=0.0)
    p.repetition_penalty = _num(d, 'repetition_penalty', 0, 10, default=1.0, lo_open=True)
    p.presence_penalty = _num(d, 'presence_penalty', -2, 2, default=0.0)
    p.frequency_penalty = _num(d, 'frequency_penalty', -2, 2, default=0.0)
    p.seed = _num(d, 'seed', 0, 2**32 - 1, integer=True)
    stop = d.get('stop')
    if isinstance(stop, str):
      stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
      raise BadRequest(f'stop must be a non-empty string or a list of up to 4 of them, got '
                       f'{stop!r}', 'stop')
    p.stop = tuple(stop or ())
    ids = d.get('stop_token_ids') or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in ids):
      raise BadRequest(f'stop_token_ids must be a list of integers, got {ids!r}', 'stop_token_ids')
    p.stop_token_ids = tuple(ids)
    p.n = _num(d, 'n', 1, max_n, integer=True, default=1)
    p.best_of = _num(d, 'best_of', 1, max_n, integer=True)
    if p.best_of is not None and p.best_of < p.n:
      raise BadRequest(f'best_of={p.best_of} must be >= n={p.n}', 'best_of')
    lp = d.get('logprobs')
    if lp is True:  # Chat: logprobs true + top_logprobs k.
      lp = d.get('top_logprobs') or 0
    elif lp is False:
      lp = None
    p.logprobs = _num({'logprobs': lp}, 'logprobs', 0, max_logprobs, integer=True)
    for flag in ('ignore_eos', 'heal'):
      v = d.get(flag, getattr(p, flag))
      if not isinstance(v, bool):
        raise BadRequest(f'{flag} must be true or false, got {v!r}', flag)
      setattr(p, flag, v)
    p.beam_width = _num(d, 'beam_width', 0, max_n, integer=True, default=0)
    p.length_penalty = _num(d, 'length_penalty', -10, 10, default=1.0)
    if p.beam_width and p.n > p.beam_width:
      raise BadRequest(f'n={p.n} must be <= beam_width={p.beam_width}', 'n')
    return p

  def sampling(self, i: int, base_seed: int) -> dict:
    return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=(base_seed + i) % 2**32)


@dataclasses.dataclass(frozen=True)
class TokenInfo:
  """One generated token for logprobs: its text, log-probability and the top alternatives."""
  id: int
  text: str
  logprob: float
  top: tuple[tuple[int, str, float], ...]


@dataclasses.dataclass(frozen=True)
class Delta:
  """New text for choice `index` (`finish` set on its last delta; `tokens` the new tokens'
  infos when logprobs were asked for)."""
  index: int
  text: str
  tokens: tuple[TokenInfo, ...] = ()
  finish: str | None = None


@dataclasses.dataclass
class Choice:
  index: int
  text: str
  token_ids: list[int]
  tokens: list[TokenInfo]
  finish: str | None
  score: float = 0.0


def mean_logprob(choice: Choice) -> float:
  """best_of's default scorer (a reward model can replace it)."""
  return float(np.mean([t.logprob for t in choice.tokens])) if choice.tokens else float('-inf')


class _Stream:
  """One sequence's detokenizer + stop-string filter."""

  def __init__(self, index: int, owner: 'Completion'):
    self.index, self.owner = index, owner
    self.ids: list[int] = []
    self.infos: list[TokenInfo] = []
    self.sent = 0             # characters of the (healed) text already streamed
    self.pending: list[TokenInfo] = []
    self.text = ''
    self.finish: str | None = None
    self.seq_id = -1

  def on_event(self, ev: Event) -> None:
    o = self.owner
    if self.finish is not None:
      return
    if ev.token is not None and not (ev.finish == 'stop' and ev.token in o.hidden_ids):
      self.ids.append(ev.token)
      text = o.token_text(ev.token)
      if not self.infos and o.removed_text and text.startswith(o.removed_text):
        text = text[len(o.removed_text):]   # Healed: the prompt already holds this part.
      info = TokenInfo(ev.token, text, ev.logprob,
                       tuple((i, o.token_text(i), lp) for i, lp in ev.top))
      self.infos.append(info)
      self.pending.append(info)
    text = o.tokenizer.decode(self.ids)
    if o.removed_text:
      text = text[len(o.removed_text):] if text.startswith(o.removed_text) else text
    finish = ev.finish
    cut = min((i for i in (text.find(s) for s in o.params.stop) if i >= 0), default=-1)
    if cut >= 0:
      text, finish = text[:cut], 'stop'
      o.engine.cancel(self.seq_id)
    self.text = text
    if finish is None:
      safe = len(text) - max((len(s) - 1 for s in o.params.stop), default=0)
      if text.endswith('\ufffd'):  # An unfinished UTF-8 character from byte pieces.
        safe = min(safe, len(text) - 1)
    else:
      safe = len(text)
      self.finish = finish
    # With logprobs every token is reported, text or not (e.g. a control piece decodes to '').
    if safe > self.sent or finish is not None or (self.pending and o.params.logprobs is not None):
      delta, self.sent = text[self.sent:max(safe, self.sent)], max(safe, self.sent)
      infos, self.pending = tuple(self.pending), []
      o.deliver(self, Delta(self.index, delta, infos if o.params.logprobs is not None else (),
                            finish))


class Completion:
  """A running request: `n` (or best_of) streams; `cancel()` frees their slots."""

  def __init__(self, completer: 'Completer', ids, params: CompletionParams, removed_text: str,
               sink: Callable[[Delta], None] | None):
    self.engine, self.tokenizer = completer.engine, completer.tokenizer
    self.token_text = completer.token_text
    self.hidden_ids = {completer.engine.eos_id} | set(params.stop_token_ids)
    self.params, self.removed_text, self.sink = params, removed_text, sink
    self.prompt_ids = ids
    self.streams = [_Stream(i, self) for i in range(params.best_of or params.n)]
    self.done = threading.Event()
    self._left = len(self.streams)
    self._lock = threading.Lock()
    self.scorer = completer.scorer

  def deliver(self, stream: _Stream, delta: Delta) -> None:
    streaming = self.params.best_of in (None, self.params.n)
    if self.sink is not None and streaming:
      self.sink(delta)
    if delta.finish is not None:
      with self._lock:
        self._left -= 1
        if self._left == 0:
          self.done.set()

  def cancel(self) -> None:
    for s in self.streams:
      self.engine.cancel(s.seq_id)

  def choices(self, timeout: float | None = None) -> list[Choice]:
    """Waits for the end; the n best by the scorer when best_of > n (in index order otherwise)."""
    if not self.done.wait(timeout):
      raise TimeoutError('completion did not finish in time')
    out = [Choice(s.index, s.text, list(s.ids), list(s.infos), s.finish) for s in self.streams]
    if len(out) > self.params.n:
      for c in out:
        c.score = self.scorer(c)
      out = sorted(out, key=lambda c: -c.score)[:self.params.n]
      for i, c in enumerate(out):
        c.index = i
    return out


class Completer:
  """The text front of an Engine for one tokenizer. `chat` turns messages into prompt ids
  (model/inference/chat.py: the checkpoint's template, else palmax's format), the same way
  supervised fine-tuning rendered them."""

  def __init__(self, engine: Engine, tokenizer, *, scorer=mean_logprob, chat=None,
               beam_model=None, prefix_ids=()):
    self.engine, self.tokenizer, self.scorer = engine, tokenizer, scorer
    # What every sequence starts with: a soft prompt's virtual tokens (model/peft/prompt.py).
    self.prefix_ids = list(prefix_ids)
    self.healer = TokenHealer(tokenizer, engine.model_cfg.vocab_size)
    self._texts = self.healer.texts
    from model.inference.chat import PalmaxChat
    self.chat = chat if chat is not None else PalmaxChat(tokenizer)
    self.beam_model = beam_model

  def token_text(self, i: int) -> str:
    return self._texts[i] if 0 <= i < len(self._texts) else ''

  def encode_prompt(self, prompt) -> list[int]:
    """Text opens like a training document (after `doc_start_id`); a list of ids is used as is
    (either after `prefix_ids`)."""
    if isinstance(prompt, str):
      return self.prefix_ids + [self.tokenizer.doc_start_id] + self.tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt and
        all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
      v = self.engine.model_cfg.vocab_size
      bad = [t for t in prompt if not 0 <= t < v]
      if bad:
        raise BadRequest(f'prompt token id {bad[0]} is outside [0, {v})', 'prompt')
      return self.prefix_ids + list(prompt)
    raise BadRequest('prompt must be a non-empty string or a list of token ids', 'prompt')

  def start(self, prompt, params: CompletionParams, sink: Callable[[Delta], None] | None = None
            ) -> Completion:
    ids = self.encode_prompt(prompt)
    removed, allowed = '', None
    if params.heal and isinstance(prompt, str):
      healed = self.healer.heal(ids)
      ids, allowed, removed = healed.ids, healed.allowed_V, healed.removed_text
    n_ctx = self.engine.model_cfg.max_seq_len
    if len(ids) >= n_ctx:
      raise BadRequest(f'the prompt has {len(ids)} tokens; the context is {n_ctx}', 'prompt', 413)
    if len(ids) + params.max_tokens > n_ctx:
      raise BadRequest(f'prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the '
                       f'context of {n_ctx} tokens', 'max_tokens')
    c = Completion(self, ids, params, removed, sink)
    if params.beam_width:
      threading.Thread(target=self._beam, args=(c,), daemon=True).start()
      return c
    base = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), 'little')
    for i, s in enumerate(c.streams):
      req = GenerationRequest(ids, params.max_tokens, params.sampling(i, base),
                              params.stop_token_ids, params.ignore_eos, params.logprobs or 0,
                              allowed)
      try:
        s.seq_id = self.engine.submit(req, s.on_event)
      except Exception:
        c.cancel()
        raise
    return c

  def complete(self, prompt, timeout: float | None = None, **params) -> list[Choice]:
    """Blocking convenience: needs an engine loop running (`serve.EngineLoop`)."""
    return self.start(prompt, CompletionParams.from_dict(params)).choices(timeout)

  def _beam(self, c: Completion) -> None:
    p = c.params
    graphdef, params = self.beam_model or (self.engine.graphdef, self.engine.params)
    results = beam_lib.beam_search(graphdef, params, c.prompt_ids, width=p.beam_width,
                                   max_new_tokens=p.max_tokens, length_penalty=p.length_penalty,
                                   eos_id=self.engine.eos_id,
                                   vocab_limit=self.engine.vocab_limit)
    for i, r in enumerate(results[:p.n]):
      s = c.streams[i]
      for t in r.tokens:
        s.ids.append(t)
      s.text = self.tokenizer.decode([t for t in r.tokens if t not in c.hidden_ids])
      s.finish = 'stop' if r.tokens and r.tokens[-1] == self.engine.eos_id else 'length'
      s.infos = []
      c.deliver(s, Delta(i, s.text, (), s.finish))
    for s in c.streams[len(results[:p.n]):]:
      s.finish = 'length'
      c.deliver(s, Delta(s.index, '', (), 'length'))

  # -- chat -------------------------------------------------------------------------------------

  def render_chat(self, messages) -> list[int]:
    """The conversation's prompt ids, ending on the assistant's turn header."""
    from model.inference.chat import check_messages
    try:
      check_messages(messages)
    except ValueError as e:
      param = str(e).split(':')[0].split(' ')[0]
      raise BadRequest(str(e), param if param.startswith('messages') else 'messages') from None
    return self.prefix_ids + self.chat.prompt_ids(messages)
