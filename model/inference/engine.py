"""Continuous batching over a paged, prefix-cached KV store (JetStream / vLLM / Levanter style).

A fixed number of decode slots. Each `step()`:
  1. retires cancelled sequences and admits waiting ones into free slots: the longest cached
     prefix of the prompt is reused (model/inference/page_pool.py), pages for the rest of the
     prompt and `max_tokens` are reserved up front (so a running sequence never runs out);
  2. runs one prefill chunk (`serve.prefill_chunk` tokens) for each of the oldest sequences
     still prefilling, up to a power-of-two rows bucket (at most `num_slots`), so a long prompt
     never stalls decoding for more than a chunk and a burst of prompts prefills together;
  3. decodes one token for every slot past its prompt, and retires those that finish (EOS, a
     stop token id, max_tokens).
Results stream out through each request's callback as `Event`s. Every shape is fixed per bucket
(prefill: one chunk size; decode: the slots x a power-of-two table width), so nothing
recompiles per request; a row's tokens depend only on its own prompt, parameters and seed.

Thread model: `submit` and `cancel` may be called from any thread; `step` from one thread (the
server runs it in a loop, `generate` runs it inline).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from model import sharding
from model.inference import engine_steps, page_pool, paged_cache, processors
from model.inference.serve_config import ServeConfig

SAMPLING_DEFAULTS = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                         presence_penalty=0.0, frequency_penalty=0.0, seed=0)
_DTYPES = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32,
               repetition_penalty=np.float32, presence_penalty=np.float32,
               frequency_penalty=np.float32, seed=np.uint32)


class QueueFull(RuntimeError):
  """The waiting queue is at `serve.max_queue` (a server answers 429)."""


@dataclasses.dataclass
class GenerationRequest:
  """One sequence to generate: token ids in, token ids out. `sampling` holds any of
  SAMPLING_DEFAULTS' keys; `logprobs` is how many top alternatives to report per token (the
  chosen token's log-probability is always reported); `allowed_first` (bool [V]) constrains the
  first token (token healing)."""
  prompt: Sequence[int]
  max_tokens: int
  sampling: dict = dataclasses.field(default_factory=dict)
  stop_token_ids: Sequence[int] = ()
  ignore_eos: bool = False
  logprobs: int = 0
  allowed_first: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Event:
  """One generated token (or, with token None, only an end): `finish` is None while running,
  else 'stop' (EOS or a stop token, which is included as `token`), 'length' or 'cancelled'."""
  seq_id: int
  token: int | None
  logprob: float | None
  top: tuple[tuple[int, float], ...]
  finish: str | None


@dataclasses.dataclass
class _Seq:
  id: int
  req: GenerationRequest
  on_event: Callable[[Event], None]
  prompt: list[int]
  hashes: list[bytes]
  submitted: float
  slot: int = -1
  pages: list[int] = dataclasses.field(default_factory=list)
  prefilled: int = 0
  registered: int = 0
  generated: list[int] = dataclasses.field(default_factory=list)
  first_token_at: float | None = None
  last_token_at: float | None = None


class Engine:
  """`Engine(graphdef, params, model_cfg, serve_cfg, eos_id=...)`; `submit(request, on_event)`
  returns a sequence id; `step()` advances everything by one token; `generate(requests)` runs
  requests to completion and returns their events. `namespace` keys the prefix cache (the
  model's and adapter's identity). With `mesh`, steps run sharded by the model's rules.
  `virtual_tokens` ids past the vocabulary may appear in prompts (a soft prompt's,
  model/peft/prompt.py); they are never sampled."""

  def __init__(self, graphdef, params, model_cfg, serve_cfg: ServeConfig | None = None, *,
               eos_id: int = -1, vocab_limit: int = 0, namespace: str = '', mesh=None,
               rules=None, observer=None, virtual_tokens: int = 0):
    self.cfg = (serve_cfg or ServeConfig()).validate()
    self.model_cfg = model_cfg
    self.graphdef, self.params = graphdef, params
    self.eos_id, self.vocab_limit, self.namespace = eos_id, vocab_limit, namespace
    self.mesh, self.rules = mesh, rules
    self.observer = observer
    self.virtual_tokens = virtual_tokens
    s, v = self.cfg.num_slots, model_cfg.vocab_size
    self.max_pages = self.cfg.pages_per_seq(model_cfg.max_seq_len)
    self.pool = page_pool.PagePool(self.cfg.total_pages(model_cfg.max_seq_len), self.cfg.page_size,
                                   self.cfg.max_cached_pages or None)
    if self.mesh is None:  # Parameters restored onto a mesh: keep every array on it.
      first = jax.tree.leaves(params)[0].sharding
      if isinstance(first, NamedSharding):
        self.mesh = first.mesh
    if self.mesh is not None and self.rules is None:
      self.rules = sharding.check_rules(sharding.DEFAULT_RULES)
    with self._context():
      self.pools = paged_cache.init_pools(model_cfg, self.pool.num_pages, self.cfg.page_size)
      self.counts_SV = jnp.zeros((s, v), jnp.int32)
      self.prompt_mask_SV = jnp.zeros((s, v), bool)
      # Committed state from the start (mesh-sharded with a mesh): the steps' outputs come back
      # that way, and a first call with other shardings would compile every step twice.
      if self.mesh is not None:
        self.pools = jax.device_put(self.pools, self._pool_shardings())
        where = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      else:
        self.pools = jax.device_put(self.pools, jax.devices()[0])
        where = jax.devices()[0]
      self.counts_SV = jax.device_put(self.counts_SV, where)
      self.prompt_mask_SV = jax.device_put(self.prompt_mask_SV, where)
    self.num_top = max(1, self.cfg.max_top_logprobs)
    self._sampling = {k: np.full((s,), d, _DTYPES[k]) for k, d in SAMPLING_DEFAULTS.items()}
    self.slots: list[_Seq | None] = [None] * s
    self.waiting: collections.deque[_Seq] = collections.deque()
    self._lock = threading.Lock()
    self._cancelled: set[int] = set()
    self._ids = itertools.count()
    self.tokens_generated = 0

  def widths(self) -> list[int]:
    """The table-width buckets steps compile for (powers of two up to the context's pages)."""
    return sorted({self._width(n * self.cfg.page_size) for n in range(1, self.max_pages + 1)})

  def warmup(self) -> None:
    """Compiles every step shape now (idle rows and the null page only), so the first
    requests do not wait for XLA."""
    s, v = len(self.slots), self.model_cfg.vocab_size
    zeros = lambda dt: np.zeros((s,), dt)
    row = {k: a[:1] for k, a in self._sampling.items()}
    with self._context():
      self.counts_SV, self.prompt_mask_SV = engine_steps.reset_row(
          self.counts_SV, self.prompt_mask_SV, np.int32(0), np.zeros((v,), bool))
      buckets = sorted({self._rows_bucket(n) for n in range(1, s + 1)})
      for w in self.widths():
        for p in buckets if w >= self._width(self.cfg.prefill_chunk) else ():
          # (Narrower prefill tables never run.)
          rows = {k: np.repeat(a, p) for k, a in row.items()}
          self.pools, _ = engine_steps.prefill(
              self.graphdef, self.params, self.pools, np.zeros((p, w), np.int32),
              np.zeros((p,), np.int32), np.zeros((p, self.cfg.prefill_chunk), np.int32),
              np.ones((p,), np.int32), rows, np.zeros((p, v), bool), np.ones((p, v), bool),
              np.int32(self.vocab_limit), num_top=self.num_top)
        self.pools, self.counts_SV, out = engine_steps.decode(
            self.graphdef, self.params, self.pools, np.zeros((s, w), np.int32), zeros(np.int32),
            zeros(np.int32), zeros(bool), zeros(np.int32), self._sampling, self.counts_SV,
            self.prompt_mask_SV, np.int32(self.vocab_limit), num_top=self.num_top)
    jax.block_until_ready(out)

  # -- public API -------------------------------------------------------------------------------

  def check(self, req: GenerationRequest) -> None:
    """ValueError naming the field if `req` can never run here."""
    n = len(req.prompt)
    if n == 0:
      raise ValueError('prompt is empty: give at least one token')
    if req.max_tokens < 1:
      raise ValueError(f'max_tokens={req.max_tokens} must be >= 1')
    if n + req.max_tokens > self.model_cfg.max_seq_len:
      raise ValueError(f'prompt of {n} tokens + max_tokens={req.max_tokens} exceeds the '
                       f'context of {self.model_cfg.max_seq_len} tokens')
    top = self.model_cfg.vocab_size + self.virtual_tokens
    bad = [t for t in req.prompt if not 0 <= int(t) < top]
    if bad:
      raise ValueError(f'prompt token id {bad[0]} is outside [0, {top})')
    if not 0 <= req.logprobs <= self.cfg.max_top_logprobs:
      raise ValueError(f'logprobs={req.logprobs} must be in [0, {self.cfg.max_top_logprobs}]')
    unknown = set(req.sampling) - set(SAMPLING_DEFAULTS)
    if unknown:
      raise ValueError(f'unknown sampling parameter(s) {sorted(unknown)}')
    # Values too: a bad one would otherwise raise inside step() (e.g. a seed outside uint32),
    # with the sequence already holding a slot and pages.
    for name, value in req.sampling.items():
      if name == 'seed':
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (
            0 <= value < 2**32)
        want = 'an integer in [0, 2**32)'
      else:
        _, rule, want = processors._RULES[name]
        try:
          a = np.asarray(value, np.float64)
          ok = np.ndim(value) == 0 and bool(rule(a)) and (name != 'top_k' or a < 2**31)
        except (TypeError, ValueError):
          ok = False
      if not ok:
        raise ValueError(f'sampling {name}={value!r} must be {want}')

  def submit(self, req: GenerationRequest, on_event: Callable[[Event], None]) -> int:
    self.check(req)
    prompt = [int(t) for t in req.prompt]
    z = self.cfg.page_size
    # Leave at least the last prompt token to prefill: its logits give the first sample.
    cacheable = ((len(prompt) - 1) // z) * z
    hashes = (page_pool.page_hashes(prompt[:cacheable], z, self.namespace)
              if self.cfg.prefix_cache else [])
    with self._lock:
      if len(self.waiting) >= self.cfg.max_queue:
        raise QueueFull(f'{len(self.waiting)} sequences are waiting (serve.max_queue='
                        f'{self.cfg.max_queue}); retry later')
      seq = _Seq(next(self._ids), req, on_event, prompt, hashes, time.perf_counter())
      self.waiting.append(seq)
    return seq.id

  def cancel(self, seq_id: int) -> None:
    """Frees the sequence's slot and pages at the next step (a no-op if it already ended)."""
    with self._lock:
      self._cancelled.add(seq_id)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(s is not None for s in self.slots) or bool(self._cancelled)

  def stats(self) -> dict:
    p = self.pool.stats()
    return dict(waiting=len(self.waiting), active=sum(s is not None for s in self.slots),
                slots=len(self.slots), pages=p.pages, pages_in_use=p.in_use,
                pages_cached=p.cached_idle, pages_free=p.free, prefix_hit_rate=p.hit_rate,
                tokens_generated=self.tokens_generated)

  def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Event]]:
    """Runs `requests` together to completion; one list of events per request."""
    out: list[list[Event]] = [[] for _ in requests]
    for i, r in enumerate(requests):
      self.submit(r, out[i].append)
    while self.has_work():
      self.step()
    return out

  def abort_running(self, finish: str) -> None:
    """Ends every running sequence with `finish` (after a failed step) and frees its pages."""
    for seq in list(self.slots):
      if seq is not None:
        self.pool.release(seq.pages)
        seq.pages = []
        self.slots[seq.slot] = None
        seq.on_event(Event(seq.id, None, None, (), finish))

  # -- one engine step --------------------------------------------------------------------------

  def step(self) -> bool:
    """Admits, prefills one chunk, decodes one token per running slot. False when idle."""
    self._retire_cancelled()
    self._admit()
    prefilling = [s for s in self.slots if s is not None and s.prefilled < len(s.prompt)]
    decoding = [s for s in self.slots if s is not None and s.prefilled == len(s.prompt)]
    if prefilling:
      self._prefill(sorted(prefilling, key=lambda s: s.id)[:self._rows_bucket(len(prefilling))])
    if decoding:
      self._decode(decoding)
    return bool(prefilling or decoding)

  def _retire_cancelled(self) -> None:
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      kept = collections.deque()
      for seq in self.waiting:
        if seq.id in cancelled:
          seq.on_event(Event(seq.id, None, None, (), 'cancelled'))
        else:
          kept.append(seq)
      self.waiting = kept
    for seq in self.slots:
      if seq is not None and seq.id in cancelled:
        self._finish(seq, None, None, (), 'cancelled')

  def _admit(self) -> None:
    z = self.cfg.page_size
    while True:
      with self._lock:
        if not self.waiting or None not in self.slots:
          return
        seq = self.waiting[0]
        # A sequence whose first page is being prefilled by another waits for it to be
        # cached (n samples of one prompt, a burst of requests sharing a system prompt).
        if seq.hashes and any(s is not None and s.prefilled < len(s.prompt) and s.hashes[:1] ==
                              seq.hashes[:1] and s.registered < len(seq.hashes)
                              for s in self.slots):
          return
        need = math.ceil((len(seq.prompt) + seq.req.max_tokens) / z)
        matched = self.pool.match(seq.hashes)
        if need - len(matched) > self.pool.available() - self.pool.idle_among(matched):
          return  # Wait for pages to come back.
        self.waiting.popleft()
      seq.pages = (self.pool.acquire_prefix(seq.hashes, len(seq.prompt)) +
                   self.pool.allocate(need - len(matched)))
      seq.prefilled, seq.registered = len(matched) * z, len(matched)
      seq.slot = self.slots.index(None)
      self.slots[seq.slot] = seq
      self._load_slot(seq)

  def _in_vocab(self, prompt) -> list[int]:
    """The prompt's ids that are vocabulary tokens (not a soft prompt's virtual ones): what the
    repetition penalties see."""
    v = self.model_cfg.vocab_size
    return prompt if not self.virtual_tokens else [t for t in prompt if t < v]

  def _load_slot(self, seq: _Seq) -> None:
    b = seq.slot
    params = dict(SAMPLING_DEFAULTS, **seq.req.sampling)
    for k, a in self._sampling.items():
      a[b] = params[k]
    mask_V = np.zeros((self.model_cfg.vocab_size,), bool)
    mask_V[self._in_vocab(seq.prompt)] = True
    with self._context():
      self.counts_SV, self.prompt_mask_SV = engine_steps.reset_row(
          self.counts_SV, self.prompt_mask_SV, np.int32(b), mask_V)

  def _table(self, seqs: Sequence[_Seq | None], width: int) -> np.ndarray:
    t = np.full((len(seqs), width), paged_cache.NULL_PAGE, np.int32)
    for i, s in enumerate(seqs):
      if s is not None:
        pages = s.pages[:width]
        t[i, :len(pages)] = pages
    return t

  def _width(self, positions: int) -> int:
    """Table width bucket: the next power of two pages covering `positions`, capped."""
    need = max(1, math.ceil(positions / self.cfg.page_size))
    return min(self.max_pages, 1 << (need - 1).bit_length())

  def _rows_bucket(self, n: int) -> int:
    """Prefill rows: the largest power of two <= n, capped by the slots. With chunks of >= 64
    tokens every bucket keeps >= 64 matmul rows, where XLA:CPU rounds a row the same whatever
    its neighbours (measured), so batching prompts does not change their tokens."""
    return min(1 << (max(n, 1).bit_length() - 1), 1 << (len(self.slots).bit_length() - 1))

  def _prefill(self, seqs: list[_Seq]) -> None:
    c, v, p = self.cfg.prefill_chunk, self.model_cfg.vocab_size, len(seqs)
    tokens = np.zeros((p, c), np.int32)
    starts, n_valid = np.zeros((p,), np.int32), np.zeros((p,), np.int32)
    allowed, mask = np.ones((p, v), bool), np.zeros((p, v), bool)
    for i, seq in enumerate(seqs):
      chunk = seq.prompt[seq.prefilled:seq.prefilled + c]
      tokens[i, :len(chunk)] = chunk
      starts[i], n_valid[i] = seq.prefilled, len(chunk)
      if seq.req.allowed_first is not None:
        allowed[i] = seq.req.allowed_first
      mask[i, self._in_vocab(seq.prompt)] = True
    width = max(self._width(s.prefilled + c) for s in seqs)
    rows = {k: a[[s.slot for s in seqs]] for k, a in self._sampling.items()}
    with self._context():
      self.pools, out = engine_steps.prefill(
          self.graphdef, self.params, self.pools, self._table(seqs, width), starts, tokens,
          n_valid, rows, mask, allowed, np.int32(self.vocab_limit), num_top=self.num_top)
    done = []
    for i, seq in enumerate(seqs):
      seq.prefilled += int(n_valid[i])
      self._register(seq, seq.prompt[:seq.prefilled], seq.hashes)
      if seq.prefilled == len(seq.prompt):
        done.append((i, seq))
    if done:
      out = sharding.to_host(out)
      for i, seq in done:
        self._emit(seq, out, i)

  def _decode(self, seqs: list[_Seq]) -> None:
    s = len(self.slots)
    # Only the rows decoding now: a row whose prefill ended this step must not be written.
    rows: list[_Seq | None] = [None] * s
    for seq in seqs:
      rows[seq.slot] = seq
    tokens, lengths = np.zeros((s,), np.int32), np.zeros((s,), np.int32)
    steps, active = np.zeros((s,), np.int32), np.zeros((s,), bool)
    for seq in seqs:
      b = seq.slot
      tokens[b], active[b] = seq.generated[-1], True
      lengths[b] = len(seq.prompt) + len(seq.generated) - 1
      steps[b] = len(seq.generated)
    width = self._width(int(lengths.max()) + 1)
    with self._context():
      self.pools, self.counts_SV, out = engine_steps.decode(
          self.graphdef, self.params, self.pools, self._table(rows, width), lengths, tokens,
          active, steps, self._sampling, self.counts_SV, self.prompt_mask_SV,
          np.int32(self.vocab_limit), num_top=self.num_top)
    out = sharding.to_host(out)
    for seq in seqs:
      self._emit(seq, out, seq.slot)

  def _emit(self, seq: _Seq, out, b: int) -> None:
    tok = int(out.token_B[b])
    k = seq.req.logprobs
    top = tuple((int(i), float(l)) for i, l in zip(out.top_ids_BK[b, :k], out.top_logprobs_BK[b, :k]))
    seq.generated.append(tok)
    self.tokens_generated += 1
    now = time.perf_counter()
    if self.observer is not None:
      if seq.first_token_at is None:
        self.observer.first_token(now - seq.submitted)
      else:
        self.observer.next_token(now - seq.last_token_at)
    if seq.first_token_at is None:
      seq.first_token_at = now
    seq.last_token_at = now
    finish = None
    if (tok == self.eos_id and not seq.req.ignore_eos) or tok in seq.req.stop_token_ids:
      finish = 'stop'
    elif len(seq.generated) >= seq.req.max_tokens:
      finish = 'length'
    if finish is None:
      seq.on_event(Event(seq.id, tok, float(out.logprob_B[b]), top, None))
    else:
      self._finish(seq, tok, float(out.logprob_B[b]), top, finish)

  def _finish(self, seq: _Seq, tok, logprob, top, finish: str) -> None:
    # Cache every full page whose keys are written (prompt and generated), then let go.
    written = seq.prompt[:seq.prefilled] + (seq.generated[:-1] if seq.prefilled == len(seq.prompt)
                                            else [])
    if self.cfg.prefix_cache:
      hashes = page_pool.page_hashes(written, self.cfg.page_size, self.namespace)
      self._register(seq, written, hashes)
    self.pool.release(seq.pages)
    seq.pages = []
    self.slots[seq.slot] = None
    seq.on_event(Event(seq.id, tok, logprob, top, finish))

  def _register(self, seq: _Seq, written: Sequence[int], hashes: Sequence[bytes]) -> None:
    full = min(len(hashes), len(written) // self.cfg.page_size)
    for i in range(seq.registered, full):
      self.pool.register(seq.pages[i], hashes[i])
    seq.registered = max(seq.registered, full)

  # -- mesh -------------------------------------------------------------------------------------

  def _context(self):
    import contextlib
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use_mesh(self.mesh, self.rules)

  def _pool_shardings(self):
    names = ('layers',) + paged_cache.PAGE_NAMES
    return jax.tree.map(lambda a: NamedSharding(self.mesh, sharding.logical_to_spec(
        names, self.rules, a.shape, self.mesh)), self.pools)
