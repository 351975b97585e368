"""The continuous-batching engine (model/inference/engine.py): greedy and seeded tokens do not
depend on the batch, the submission order or prefix-cache hits; sampling parameters, penalties,
log-probs and stop conditions act; cancellation and the queue bound free what they hold; long
prompts do not stall decoding; nothing recompiles per request; tensor parallel gives the same
tokens. One model and one engine (its compiled steps) serve the module."""
import collections
import math

import jax
import numpy as np
import pytest
from flax import nnx

from model import sharding, transformer
from model.inference import engine_steps
from model.inference.engine import Engine, GenerationRequest, QueueFull
from model.inference.sampler import Sampler
from model.inference.serve_config import ServeConfig
from tests.conftest import tiny_model_config
from train import state as state_lib

CFG = tiny_model_config(max_seq_len=512, vocab_size=97)
V, Z = CFG.vocab_size, 16
SERVE = ServeConfig(num_slots=8, page_size=Z, prefill_chunk=64)
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05)


@pytest.fixture(scope='module')
def model():
  graphdef, params = nnx.split(transformer.build(CFG, seed=3))
  return graphdef, params.to_pure_dict()


@pytest.fixture(scope='module')
def engine(model):
  return Engine(*model, CFG, SERVE)


@pytest.fixture(autouse=True)
def everything_returned(request):
  """After every test the module engine is idle and every page is back (cached or free)."""
  yield
  if 'engine' in request.fixturenames:
    eng = request.getfixturevalue('engine')
    assert not eng.has_work() and eng.slots == [None] * SERVE.num_slots
    assert eng.pool.all_free() and eng.pool.stats().in_use == 0


@pytest.fixture(scope='module')
def reference(model):
  """The uncached forward: tokens -> the logits [V] after the last one (f32 numpy), right-padded
  to one shape (causal: the padding cannot change them)."""
  graphdef, params = model
  f = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])

  def last_logits(seq):
    arr = np.zeros((1, 64), np.int32)
    arr[0, :len(seq)] = seq
    return np.asarray(f(params, arr))[0, len(seq) - 1]

  return last_logits


def prompt(n, seed, vocab=V):
  return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def toks(events):
  return [e.token for e in events if e.token is not None]


def alone(eng, req):
  """`req` run by itself with an empty prefix cache: nothing shared with any other run."""
  eng.pool.clear_cache()
  return eng.generate([req])[0]


def log_softmax(x):
  x = x.astype(np.float64)
  return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


def check_events(events, n, finish):
  """n tokens, only the last one ends the sequence, with `finish`."""
  assert len(events) == n and len({e.seq_id for e in events}) == 1
  assert all(e.finish is None for e in events[:-1]) and events[-1].finish == finish


# -- greedy: alone, batched, shuffled, cached -------------------------------------------------

LENGTHS = np.linspace(1, 300, 64).round().astype(int)
PROMPTS = [prompt(int(n), seed=100 + i) for i, n in enumerate(LENGTHS)]


def test_64_greedy_requests_same_alone_batched_shuffled_and_as_the_dense_sampler(model, engine):
  """Prompts of 1..300 tokens: all 64 together (8 slots, chunked prefill), in a shuffled order
  and (12 of them) alone give the same tokens, and those of the dense-cache Sampler."""
  reqs = [GenerationRequest(p, 8) for p in PROMPTS]
  engine.pool.clear_cache()
  generated = engine.stats()['tokens_generated']
  out = engine.generate(reqs)
  for ev in out:
    check_events(ev, 8, 'length')
    assert all(e.top == () and e.logprob is not None for e in ev)
  together = [toks(ev) for ev in out]
  assert engine.stats()['tokens_generated'] == generated + 64 * 8
  assert len({tuple(t) for t in together}) > 32        # Not one degenerate answer.
  # The dense reference (one padded batch) equals the engine exactly on this XLA:CPU for all 64
  # rows; a different build could round a long prompt's logits differently.
  dense = Sampler(*model, max_seq_len=CFG.max_seq_len)(PROMPTS, max_new_tokens=8)
  assert together == dense
  order = np.random.default_rng(0).permutation(len(reqs))
  engine.pool.clear_cache()
  shuffled = engine.generate([reqs[i] for i in order])
  assert [toks(shuffled[j]) for j in np.argsort(order)] == together
  for i in np.linspace(0, len(reqs) - 1, 12).round().astype(int):
    assert toks(alone(engine, reqs[i])) == together[i], f'prompt of {LENGTHS[i]} tokens'


def served_from_cache(prompt_, written):
  """Prompt tokens the prefix cache can serve: the full pages shared with a written sequence
  (prompt + generated tokens of a finished one), never the prompt's last token."""
  best = 0
  for w in written:
    n = 0
    while n < min(len(prompt_), len(w)) and prompt_[n] == w[n]:
      n += 1
    best = max(best, n)
  return min(best, len(prompt_) - 1) // Z * Z


def test_prefix_cache_hits_give_identical_tokens(engine):
  """Prompts that are prefixes / extensions of each other, a second turn over a first turn's
  answer and the same prompt twice: served partly from the prefix cache (exact hit counts),
  they give the tokens they give alone with an empty cache."""
  base, tail = prompt(280, seed=1), prompt(40, seed=2)
  reqs = [GenerationRequest(p, 8) for p in
          (base[:250], base + tail[:15], base[:100] + tail, base[:40], base[:100], base,
           base[:17], base[:16])]
  ref = [toks(alone(engine, r)) for r in reqs]
  turn2 = GenerationRequest(base[:250] + ref[0] + tail[:20], 8)   # Over turn 1's answer.
  reqs.append(turn2)
  ref.append(toks(alone(engine, turn2)))

  engine.pool.clear_cache()
  written = []
  # One at a time first: each hits what the earlier ones wrote (turn 2 hits a page holding
  # turn 1's generated tokens), then everything together, all served from the cache.
  for i in (0, 8, 1, 2):
    before = engine.pool.stats().hit_tokens
    assert toks(engine.generate([reqs[i]])[0]) == ref[i]
    assert engine.pool.stats().hit_tokens - before == served_from_cache(reqs[i].prompt, written)
    written.append(list(reqs[i].prompt) + ref[i][:-1])
  assert served_from_cache(turn2.prompt, written[:1]) == 256 > 250
  before = engine.pool.stats().hit_tokens
  out = engine.generate(reqs + [reqs[5]])
  assert [toks(ev) for ev in out] == ref + [ref[5]]
  assert engine.pool.stats().hit_tokens - before == sum(
      (len(r.prompt) - 1) // Z * Z for r in reqs + [reqs[5]])
  assert engine.stats()['prefix_hit_rate'] > 0
  # Near the end of the context: after a hit of 30 pages the prefill chunk (480..543) runs
  # past the last page (512).
  long = GenerationRequest(prompt(490, 3), 8)
  ref_long = toks(alone(engine, long))
  before = engine.pool.stats().hit_tokens
  assert toks(engine.generate([long])[0]) == ref_long
  assert engine.pool.stats().hit_tokens - before == 480


# -- sampling, penalties, log-probs -----------------------------------------------------------

def test_seeded_sampling_same_alone_and_batched_and_filters_act(engine):
  """temperature / top-k / top-p / min-p with per-request seeds (one also penalised): the same
  tokens alone, batched and shuffled; different seeds differ, equal seeds agree; every drawn
  token is inside the top-k, min-p and top-p sets of the raw distribution."""
  p0, p1, p2 = prompt(30, 10), prompt(70, 11), prompt(5, 12)
  reqs = [GenerationRequest(p0, 10, dict(SAMPLED, seed=s), logprobs=20) for s in (1, 2, 3)]
  reqs += [GenerationRequest(p0, 10, dict(SAMPLED, seed=1)),
           GenerationRequest(p1, 10, dict(SAMPLED, seed=7)),
           GenerationRequest(p2, 10, dict(SAMPLED, seed=8, repetition_penalty=1.3,
                                          presence_penalty=0.5, frequency_penalty=0.5)),
           GenerationRequest(p1, 10)]
  ref = [toks(alone(engine, r)) for r in reqs]
  engine.pool.clear_cache()
  batched = engine.generate(reqs)
  assert [toks(ev) for ev in batched] == ref
  order = [6, 3, 5, 0, 4, 2, 1]
  shuffled = engine.generate([reqs[i] for i in order])
  assert [toks(shuffled[order.index(i)]) for i in range(len(reqs))] == ref
  assert len({tuple(r) for r in ref[:3]}) == 3 and ref[3] == ref[0]
  assert ref[4] != ref[6]                              # Sampled, not greedy.
  t, n_in = SAMPLED['temperature'], 0
  for ev in batched[:3]:
    for e in ev:
      ids = [i for i, _ in e.top]
      lp = np.asarray([l for _, l in e.top])
      assert len(e.top) == 20 and e.token in ids       # top_k=20 of the raw distribution.
      assert e.logprob - lp[0] >= t * math.log(SAMPLED['min_p']) - 1e-5
      q = np.exp((lp - lp.max()) / t)
      q /= q.sum()                                      # The top-20 distribution at temperature t.
      r = ids.index(e.token)
      assert np.sum(q[:r]) < SAMPLED['top_p'] + 1e-5
      n_in += r > 0
  assert n_in > 5                                      # Not just the most likely token.


def penalised_greedy(reference, prompt_, n, repetition_penalty=1.0, presence_penalty=0.0,
                     frequency_penalty=0.0):
  """Greedy tokens with HF repetition and OpenAI presence/frequency penalties applied in numpy
  to the uncached forward's logits."""
  rep, pres, freq = (np.float32(x) for x in (repetition_penalty, presence_penalty,
                                               frequency_penalty))
  out = []
  for _ in range(n):
    logits = reference(list(prompt_) + out)
    counts = np.bincount(np.asarray(out, np.int64), minlength=V).astype(np.float32)
    seen = np.zeros(V, bool)
    seen[list(prompt_)] = True
    seen |= counts > 0
    logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - pres * (counts > 0) - freq * counts
    out.append(int(np.argmax(logits)))
  return out


def test_penalties_and_logprobs_follow_the_uncached_reference(engine, reference):
  """Penalised greedy requests equal a numpy re-implementation over the uncached forward; a
  strong frequency penalty makes repeated tokens rarer; log-probs are the raw model's (the
  chosen token's and the top 5 per position, within 1e-4), whatever the penalties did."""
  p = prompt(12, 20)
  cases = [dict(), dict(frequency_penalty=2.0), dict(presence_penalty=1.5),
           dict(repetition_penalty=1.5),
           dict(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.7)]
  n = 14
  out = engine.generate([GenerationRequest(p, n, c, logprobs=5) for c in cases])
  got = [toks(ev) for ev in out]
  for c, g in zip(cases, got):
    assert g == penalised_greedy(reference, p, n, **c), c
  greedy, freq = collections.Counter(got[0]), collections.Counter(got[1])
  repeated = [t for t, k in greedy.items() if k > 1]
  assert repeated and all(freq[t] < greedy[t] for t in repeated)
  assert max(freq.values()) < max(greedy.values())
  for g, ev in zip(got, out):
    for i, e in enumerate(ev):
      raw = log_softmax(reference(p + g[:i]))
      assert abs(e.logprob - raw[e.token]) < 1e-4
      assert len(e.top) == 5
      np.testing.assert_allclose([l for _, l in e.top], np.sort(raw)[::-1][:5], atol=1e-4)
      assert [l for _, l in e.top] == sorted((l for _, l in e.top), reverse=True)
      assert all(abs(raw[i_] - l) < 1e-4 for i_, l in e.top)
  assert all(e.top[0] == (e.token, e.logprob) for e in out[0])   # Greedy: the best token.
  assert any(e.top[0][0] != e.token for e in out[1])             # Penalised: not always.


# -- stop conditions --------------------------------------------------------------------------

def test_stop_token_eos_ignore_eos_and_length(model, engine):
  """A stop token id or EOS ends the sequence with 'stop' and is its last token; ignore_eos
  runs past EOS (not past a stop id) to max_tokens ('length')."""
  p = prompt(9, 30)
  full = toks(engine.generate([GenerationRequest(p, 12)])[0])
  k = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])
  stop = full[k]
  never = next(t for t in range(V) if t not in full)
  ev = engine.generate([GenerationRequest(p, 12, stop_token_ids=[never, stop])])[0]
  check_events(ev, k + 1, 'stop')
  assert toks(ev) == full[:k + 1]
  ev = engine.generate([GenerationRequest(p, 12, stop_token_ids=[stop], ignore_eos=True)])[0]
  assert toks(ev) == full[:k + 1] and ev[-1].finish == 'stop'
  ev = engine.generate([GenerationRequest(p, 5)])[0]
  check_events(ev, 5, 'length')
  assert toks(ev) == full[:5]

  eos = Engine(*model, CFG, SERVE, eos_id=stop)      # Same shapes: the same compiled steps.
  ev = eos.generate([GenerationRequest(p, 12)])[0]
  check_events(ev, k + 1, 'stop')
  assert toks(ev) == full[:k + 1]
  ev = eos.generate([GenerationRequest(p, 12, ignore_eos=True)])[0]
  check_events(ev, 12, 'length')
  assert toks(ev) == full
  assert eos.pool.all_free() and not eos.has_work()


# -- cancellation, queue, bad requests --------------------------------------------------------

def test_cancel_running_prefilling_and_waiting_sequences(engine):
  """Cancelled sequences end with one 'cancelled' event (running: after the tokens they got;
  mid-prefill or waiting: with none) and free their slots and pages at the next step; the
  others' tokens are those they give alone."""
  reqs = {name: GenerationRequest(prompt(n, seed), m) for name, n, m, seed in
          (('a', 40, 30, 40), ('b', 150, 8, 41), ('c', 10, 8, 42), ('d', 200, 8, 43))}
  ref = {name: toks(alone(engine, reqs[name])) for name in 'bc'}
  engine.pool.clear_cache()
  events = collections.defaultdict(list)
  ids = {name: engine.submit(r, events[name].append) for name, r in reqs.items()}
  w = engine.submit(GenerationRequest(prompt(5, 44), 4), events['w'].append)
  engine.cancel(w)                                     # Cancelled while waiting.

  def running():
    return {s.id for s in engine.slots if s is not None}

  def held():
    return sum(len(s.pages) for s in engine.slots if s is not None)

  engine.step()
  assert [e.finish for e in events['w']] == ['cancelled'] and events['w'][0].token is None
  assert w not in running() and engine.pool.stats().in_use == held()
  d = next(s for s in engine.slots if s is not None and s.id == ids['d'])
  while d.prefilled == 0 or len(events['a']) < 3:      # Prompts prefill a chunk a step.
    engine.step()
  assert 0 < d.prefilled < 200 and len(events['a']) >= 3   # d mid-prefill, a decoding.
  engine.cancel(ids['a'])
  engine.cancel(ids['d'])
  n_a = len(events['a'])
  engine.step()
  assert ids['a'] not in running() and ids['d'] not in running()
  assert engine.pool.stats().in_use == held()          # Their pages are back.
  assert len(events['a']) == n_a + 1 and events['a'][-1].finish == 'cancelled'
  assert events['a'][-1].token is None and all(e.finish is None for e in events['a'][:-1])
  assert [e.finish for e in events['d']] == ['cancelled']
  while engine.has_work():
    engine.step()
  engine.cancel(ids['c'])                              # Already ended: a no-op.
  engine.step()
  assert toks(events['b']) == ref['b'] and toks(events['c']) == ref['c']
  assert [e.finish for e in events['c']].count('cancelled') == 0
  assert len(toks(events['a'])) == n_a < 30


def test_queue_bound_and_bad_requests_are_refused(model, engine):
  """More than max_queue waiting sequences: QueueFull (accepted again once admitted); requests
  that can never run: ValueError naming the field; nothing is held after refusals."""
  q = Engine(*model, CFG, ServeConfig(num_slots=8, page_size=Z, prefill_chunk=64, max_queue=3))
  out = collections.defaultdict(list)
  for i in range(3):
    q.submit(GenerationRequest(prompt(4, i), 2), out[i].append)
  with pytest.raises(QueueFull, match='max_queue=3'):
    q.submit(GenerationRequest(prompt(4, 9), 2), out[9].append)
  q.step()                                             # Admits all three (8 slots).
  q.submit(GenerationRequest(prompt(4, 9), 2), out[9].append)
  while q.has_work():
    q.step()
  assert sorted(out) == [0, 1, 2, 9] and all(len(toks(v)) == 2 for v in out.values())
  assert q.pool.all_free()

  n = CFG.max_seq_len
  bad = [(GenerationRequest([], 4), 'prompt is empty'),
         (GenerationRequest([1], 0), 'max_tokens'),
         (GenerationRequest([1] * (n - 3), 4), 'max_tokens=4 exceeds'),
         (GenerationRequest([1, V], 4), f'token id {V}'),
         (GenerationRequest([1, -1], 4), 'token id -1'),
         (GenerationRequest([1], 4, logprobs=SERVE.max_top_logprobs + 1), 'logprobs'),
         (GenerationRequest([1], 4, dict(temprature=0.5)), 'temprature'),
         (GenerationRequest([1], 4, dict(seed=-1)), 'seed'),
         (GenerationRequest([1], 4, dict(seed=2**32)), 'seed'),
         (GenerationRequest([1], 4, dict(top_p=0.0)), 'top_p'),
         (GenerationRequest([1], 4, dict(temperature=-1.0)), 'temperature'),
         (GenerationRequest([1], 4, dict(top_k=2**40)), 'top_k'),
         (GenerationRequest([1], 4, dict(frequency_penalty='high')), 'frequency_penalty')]
  for req, match in bad:
    with pytest.raises(ValueError, match=match):
      engine.submit(req, lambda e: None)
  assert not engine.has_work()
  fits = engine.submit(GenerationRequest([1] * (n - 4), 4), lambda e: None)   # Accepted.
  engine.cancel(fits)
  engine.step()


# -- continuous batching ----------------------------------------------------------------------

def test_more_requests_than_slots_and_long_prefill_does_not_stall_decoding(model, engine):
  """2 slots, 5 requests: all complete with their alone tokens; while a 4-chunk prompt
  prefills, the decoding sequence still gets a token on every step."""
  two = Engine(*model, CFG, ServeConfig(num_slots=2, page_size=Z, prefill_chunk=64,
                                        num_pages=SERVE.total_pages(CFG.max_seq_len)))
  # Prompts of 193..256 tokens: every decode step has one table width (one compile).
  reqs = [GenerationRequest(prompt(200, 50), 12), GenerationRequest(prompt(240, 51), 3)]
  reqs += [GenerationRequest(prompt(n, 52 + n), 4) for n in (195, 210, 230)]
  per_step, events = [], collections.defaultdict(list)

  def on_event(e):
    events[e.seq_id].append(e)
    per_step[-1].append(e.seq_id)

  def step():
    per_step.append([])
    two.step()

  a = two.submit(reqs[0], on_event)
  while not events[a]:
    step()
  assert len(per_step) == 4                            # 4 chunks, then its first token.
  b = two.submit(reqs[1], on_event)
  rest = [two.submit(r, on_event) for r in reqs[2:]]
  step()                                               # b admitted: both slots busy.
  assert two.stats()['active'] == 2 and two.stats()['waiting'] == 3
  while two.has_work():
    step()
  assert [s.count(a) for s in per_step[3:3 + 12]] == [1] * 12, per_step  # A token a step ...
  first_b = next(i for i, s in enumerate(per_step) if b in s)
  assert first_b == 4 + 3                              # ... while b prefilled 4 chunks.
  assert [len(events[i]) for i in [a, b] + rest] == [12, 3, 4, 4, 4]
  assert all(events[i][-1].finish == 'length' for i in [a, b] + rest)
  for i, r in zip([a, b] + rest, reqs):
    assert toks(events[i]) == toks(alone(engine, r))   # The 8-slot engine alone.
  assert two.pool.all_free()


# -- compilation ------------------------------------------------------------------------------

def test_no_recompilation_per_request(engine):
  """After `warmup()` (every table-width and prefill-rows bucket), requests of other lengths,
  sampling parameters, log-probs and stop ids compile nothing."""
  engine.warmup()
  sizes = lambda: (engine_steps.prefill._cache_size(), engine_steps.decode._cache_size(),
                   engine_steps.reset_row._cache_size())
  before = sizes()
  rng = np.random.default_rng(60)
  reqs = []
  for i, n in enumerate((1, 7, 33, 64, 65, 130, 290, 480)):
    sampling = [{}, dict(SAMPLED, seed=i), dict(temperature=1.3, top_k=3),
                dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2)][i % 4]
    reqs.append(GenerationRequest(rng.integers(0, V, n).tolist(), int(rng.integers(1, 9)),
                                  sampling, stop_token_ids=[int(rng.integers(V))],
                                  logprobs=int(rng.integers(0, 6))))
  engine.generate(reqs[:3])
  engine.generate(reqs[3:])
  engine.generate(reqs[::2])
  assert sizes() == before


# -- tensor parallel --------------------------------------------------------------------------

def test_tensor_parallel_engine_gives_the_same_tokens():
  """On 8 simulated devices (tensor=8, heads and kv heads divisible) the weights and the KV
  pools are sharded and greedy tokens equal the 1-device engine's."""
  assert jax.device_count() == 8
  cfg = tiny_model_config(num_heads=8, num_kv_heads=8, mlp_dim=64, vocab_size=96)
  graphdef, params = nnx.split(transformer.build(cfg, seed=7))
  params = params.to_pure_dict()
  serve = ServeConfig(num_slots=4, page_size=Z, prefill_chunk=64)
  # Prompts 17-24 and 6 new tokens: one prefill and one decode table width.
  reqs = [GenerationRequest(prompt(n, 70 + n, cfg.vocab_size), 6) for n in (17, 20, 23, 24)]
  # One device: the dense Sampler (which the 1-device engine equals, see the greedy test).
  ref = Sampler(graphdef, params)([r.prompt for r in reqs], max_new_tokens=6)

  mesh = sharding.make_mesh({'tensor': 8})
  # The stock rules replicate kv heads (GQA counts rarely divide); shard them here.
  rules = dict(sharding.check_rules(sharding.DEFAULT_RULES),
               kv_heads=('tensor',), act_kv_heads=('tensor',))
  _, _, shardings = state_lib.param_shardings(cfg, mesh, rules)
  sharded = jax.device_put(params, shardings)
  w_k = sharded['stack0']['block0']['attn']['w_k']
  assert not w_k.sharding.is_fully_replicated
  tp = Engine(graphdef, sharded, cfg, serve, mesh=mesh, rules=rules)
  pools = jax.tree.leaves(tp.pools)
  assert all(not a.sharding.is_fully_replicated and 'tensor' in a.sharding.spec for a in pools)
  assert pools[0].addressable_shards[0].data.shape[-2] == cfg.num_kv_heads // 8
  out = tp.generate(reqs)
  assert [toks(ev) for ev in out] == ref
  assert all(not a.sharding.is_fully_replicated for a in jax.tree.leaves(tp.pools))
  assert tp.pool.all_free()

