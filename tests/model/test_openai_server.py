"""The OpenAI-compatible server end to end, driven by the `openai` client: completions, chat,
streaming, n, best_of, logprobs, stop strings, seeds (server: tests/model/conftest.py)."""
from __future__ import annotations

import pytest

openai = pytest.importorskip('openai')
try:
  import httpx
except ImportError:  # This venv's openai client ships the httpx2 fork (same API).
  httpx = pytest.importorskip('httpx2')

from model.inference.chat import PalmaxChat  # noqa: E402
from tests.model.serving_util import MODEL, encode, greedy, stream_texts  # noqa: E402


def test_models_lists_the_model(served):
  models = served.keyed.client().models.list()
  assert [m.id for m in models.data] == [MODEL]
  assert models.data[0].owned_by == 'palmax'


def test_completion_greedy_is_deterministic_and_streams_the_same_text(served):
  client = served.keyed.client()
  prompt = 'def func_1'
  a = greedy(client, prompt, max_tokens=20)
  b = greedy(client, prompt, max_tokens=20)
  assert a.object == 'text_completion' and a.model == MODEL and a.id.startswith('cmpl-')
  assert [c.text for c in a.choices] == [c.text for c in b.choices]
  (c,) = a.choices
  assert c.index == 0 and c.finish_reason in ('stop', 'length') and c.logprobs is None
  assert a.usage.prompt_tokens == len(served.completer.healer.heal(encode(served, prompt)).ids)
  assert a.usage.completion_tokens == 20 if c.finish_reason == 'length' else \
      a.usage.completion_tokens <= 20
  assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens

  chunks = greedy(client, prompt, max_tokens=20, stream=True,
                  stream_options={'include_usage': True})
  texts, finish, seen = stream_texts(chunks, chat=False)
  assert texts == {0: c.text} and finish == {0: c.finish_reason}
  assert len(seen) > 2, 'a 20-token completion should stream in several chunks'
  assert seen[-1].choices == [] and seen[-1].usage.model_dump() == a.usage.model_dump()


def test_chat_greedy_is_deterministic_and_streams_the_same_text(served):
  client = served.keyed.client()
  messages = [{'role': 'user', 'content': 'def add(x):'}]
  kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=16)
  a = client.chat.completions.create(**kw)
  b = client.chat.completions.create(**kw)
  assert a.object == 'chat.completion' and a.id.startswith('chatcmpl-')
  (c,) = a.choices
  assert c.message.role == 'assistant' and c.message.content == b.choices[0].message.content
  assert c.finish_reason in ('stop', 'length')
  chunks = list(client.chat.completions.create(stream=True, **kw))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert all(ch.object == 'chat.completion.chunk' and ch.id == chunks[0].id for ch in chunks)
  texts, finish, _ = stream_texts(chunks, chat=True)
  assert texts == {0: c.message.content} and finish == {0: c.finish_reason}


def test_chat_uses_the_default_template(served):
  client = served.keyed.client()
  # (The 64-token context holds only short conversations: '<|user|>\n' alone is 8 tokens.)
  messages = [{'role': 'system', 'content': 'Hi.'}, {'role': 'user', 'content': 'x = 1'}]
  tok = served.completer.tokenizer
  ids = PalmaxChat(tok).prompt_ids(messages)
  # (documented: train/sft_data.py trains on exactly these ids before an assistant's reply)
  assert tok.decode(ids) == '<|system|>\nHi.\n<|user|>\nx = 1\n<|assistant|>\n'
  assert ids[0] == tok.doc_start_id
  raw = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=8)
  assert raw.usage.prompt_tokens == len(ids)
  want = served.completer.complete(ids, max_tokens=8, temperature=0.0, timeout=60)[0].text
  assert raw.choices[0].message.content == want


def test_max_completion_tokens_is_max_tokens(served):
  r = served.keyed.client().chat.completions.create(
      model=MODEL, messages=[{'role': 'user', 'content': 'a'}], temperature=0,
      max_completion_tokens=3, extra_body={'ignore_eos': True})
  assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == 'length'


@pytest.mark.parametrize('chat', [False, True], ids=['completions', 'chat'])
def test_n_samples_with_a_seed_are_reproducible_and_stream_the_same(served, chat):
  client = served.keyed.client()
  n = 2 if chat else 3
  if chat:
    kw = dict(model=MODEL, messages=[{'role': 'user', 'content': 'import'}], n=n,
              temperature=1.0, max_tokens=10, seed=1234)
    create = client.chat.completions.create
    text = lambda c: c.message.content
  else:
    kw = dict(model=MODEL, prompt='class A', n=n, temperature=1.0, max_tokens=10, seed=1234)
    create = client.completions.create
    text = lambda c: c.text
  a, b = create(**kw), create(**kw)
  assert [c.index for c in a.choices] == list(range(n))
  got = {c.index: text(c) for c in a.choices}
  assert got == {c.index: text(c) for c in b.choices}
  assert len(set(got.values())) > 1, 'n samples at temperature 1 should differ'
  other = create(**dict(kw, seed=4321))
  assert {c.index: text(c) for c in other.choices} != got
  texts, finish, _ = stream_texts(create(stream=True, **kw), chat)
  assert texts == got
  assert finish == {c.index: c.finish_reason for c in a.choices}


def test_best_of_returns_n_choices(served):
  r = served.keyed.client().completions.create(model=MODEL, prompt='def', n=2, best_of=4,
                                               temperature=1.0, max_tokens=6, seed=7)
  assert [c.index for c in r.choices] == [0, 1]
  assert all(c.finish_reason in ('stop', 'length') for c in r.choices)


def test_prompt_list_and_token_ids(served):
  client = served.keyed.client()
  r = greedy(client, ['def f', 'x = '], n=2, max_tokens=6)
  assert [c.index for c in r.choices] == [0, 1, 2, 3]
  alone = [greedy(client, p, max_tokens=6).choices[0].text for p in ('def f', 'x = ')]
  assert [c.text for c in r.choices] == [alone[0]] * 2 + [alone[1]] * 2
  ids = encode(served, 'def f')
  by_ids = greedy(client, ids, max_tokens=6)
  assert by_ids.usage.prompt_tokens == len(ids)
  assert by_ids.choices[0].text == greedy(client, 'def f', max_tokens=6).choices[0].text


def _check_top_dict(top: dict, k: int):
  # A dict keyed by token text: distinct ids with one text (byte pieces shown as U+FFFD) merge.
  assert 1 <= len(top) <= k
  assert len(top) == k or any('\ufffd' in t for t in top), top


def test_completion_logprobs(served):
  client = served.keyed.client()
  kw = dict(max_tokens=12, logprobs=3, extra_body={'heal': False, 'ignore_eos': True})
  r = greedy(client, 'def func_2', **kw)
  (c,) = r.choices
  lp = c.logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
  assert ''.join(lp.tokens) == c.text
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
  for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    _check_top_dict(top, 3)
    assert logprob <= 0
    # Greedy: the chosen token is the most likely one.
    assert logprob == pytest.approx(max(top.values()), abs=1e-5)
    assert tok in top
  streamed = list(greedy(client, 'def func_2', stream=True, **kw))
  tokens = [t for ch in streamed for t in (ch.choices[0].logprobs.tokens if ch.choices and
                                           ch.choices[0].logprobs else [])]
  offsets = [o for ch in streamed for o in (ch.choices[0].logprobs.text_offset if ch.choices and
                                            ch.choices[0].logprobs else [])]
  assert tokens == lp.tokens and offsets == lp.text_offset
  plain = greedy(client, 'def func_2', max_tokens=3)
  assert plain.choices[0].logprobs is None


def test_chat_logprobs(served):
  client = served.keyed.client()
  r = client.chat.completions.create(
      model=MODEL, messages=[{'role': 'user', 'content': 'for i in'}], temperature=0,
      max_tokens=8, logprobs=True, top_logprobs=2, extra_body={'heal': False, 'ignore_eos': True})
  (c,) = r.choices
  content = c.logprobs.content
  assert len(content) == 8 and ''.join(e.token for e in content) == c.message.content
  for e in content:
    assert e.bytes == list(e.token.encode()) and e.logprob <= 0
    assert 1 <= len(e.top_logprobs) == 2
    assert e.logprob == pytest.approx(max(t.logprob for t in e.top_logprobs), abs=1e-5)
  none = client.chat.completions.create(model=MODEL, messages=[{'role': 'user', 'content': 'a'}],
                                        max_tokens=2, temperature=0, top_logprobs=2)
  assert none.choices[0].logprobs is None   # top_logprobs without logprobs: none


def _stop_case(client, chat: bool):
  """A greedy output and a stop string it contains (from the model's own text)."""
  for prompt in ('def func_1', 'import os', 'class A', 'x = 1', 'return x', 'if x >'):
    out = _create(client, chat, prompt, max_tokens=20)
    text = out[0]
    for i in range(1, len(text) - 2):
      stop = text[i:i + 2]
      if '\ufffd' not in stop and stop.strip():
        return prompt, text, stop
  pytest.fail('no greedy output held a usable stop string')


def _create(client, chat, prompt, stream=False, **kw):
  """(text, finish_reason) of a greedy request (streamed text concatenated)."""
  if chat:
    r = client.chat.completions.create(model=MODEL, messages=[{'role': 'user', 'content': prompt}],
                                       temperature=0, stream=stream, **kw)
  else:
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, stream=stream, **kw)
  if stream:
    texts, finish, _ = stream_texts(r, chat)
    return texts[0], finish[0]
  c = r.choices[0]
  return (c.message.content if chat else c.text), c.finish_reason


@pytest.mark.parametrize('chat', [False, True], ids=['completions', 'chat'])
@pytest.mark.parametrize('stream', [False, True], ids=['whole', 'stream'])
def test_stop_strings(served, chat, stream):
  client = served.keyed.client()
  prompt, text, stop = _stop_case(client, chat)
  want = text[:text.find(stop)]
  got, finish = _create(client, chat, prompt, stream=stream, max_tokens=20, stop=stop)
  assert (got, finish) == (want, 'stop')
  assert stop not in got
  # Several stop strings: the earliest match wins.
  later = text[len(want) + 1:len(want) + 4] or 'zzz'
  got, finish = _create(client, chat, prompt, stream=stream, max_tokens=20,
                        stop=[later, stop, '\u2603never'])
  assert (got, finish) == (want, 'stop')


# -- errors -----------------------------------------------------------------------------------
