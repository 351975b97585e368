"""Serving benchmarks (figures printed, never asserted): a tiny random Llama made with
`transformers`, converted with launch.convert, served by palmax.

  python -m launch.bench_serve [--rounds=3 --clients=16 --new_tokens=64 --prefix=1024]

1. palmax engine vs `transformers` `generate` on the same model, greedy, batch 1 and batch 16:
   tokens/s (interleaved rounds, medians [min-max], the ratio paired by round) and whether
   the tokens are the same.
2. The OpenAI server on 127.0.0.1: `clients` concurrent streaming clients against the same
   requests sent one after another: throughput, time to first token and inter-token latency
   p50 / p99 (measured by the clients, one chunk per token).
3. Time to first token of a request sharing a `prefix`-token prompt prefix with an earlier one
   (a prefix-cache hit) against a fresh prefix of the same length.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import threading
import time

from absl import flags

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.')
_CLIENTS = flags.DEFINE_integer('clients', 16, 'Concurrent clients (and engine slots).')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per request.')
_PROMPT = flags.DEFINE_integer('prompt_tokens', 32, 'Prompt length of the throughput requests.')
_PREFIX = flags.DEFINE_integer('prefix', 1024, 'Shared prefix length for the TTFT check.')
_SEED = flags.DEFINE_integer('seed', 0, 'Model and prompt seed.')

LLAMA = dict(vocab_size=4096, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
             head_dim=64, intermediate_size=768, num_hidden_layers=4, max_position_embeddings=2048,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False)


def make_workdir(root: str, seed: int) -> tuple[str, str]:
  """(hf_dir, palmax_workdir) of a random tiny Llama with a small SentencePiece tokenizer."""
  import io
  import sentencepiece as spm
  import torch
  import transformers
  from launch import convert
  hf_dir, px = os.path.join(root, 'hf'), os.path.join(root, 'px')
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
  model.save_pretrained(hf_dir)
  text = '\n'.join(f'def f{i}(x):\n    return x * {i} + {i % 7}' for i in range(300))
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split('\n')), model_writer=buf,
                                 vocab_size=200, model_type='bpe', unk_id=0, bos_id=1, eos_id=2,
                                 pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(hf_dir, 'tokenizer.model'), 'wb') as f:
    f.write(buf.getvalue())
  convert.run('hf', None, 'llama', hf_dir, px, log=lambda *_: None)
  return hf_dir, px


def _spread(xs):
  return f'{statistics.median(xs):,.0f} [{min(xs):,.0f}-{max(xs):,.0f}]'


def _pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float('nan')


def bench_vs_hf(hf_dir, px, rounds, new_tokens, prompt_tokens, seed):
  import numpy as np
  import torch
  import transformers
  from launch.workdir import load_model
  from model.inference.engine import Engine, GenerationRequest
  from model.inference.serve_config import ServeConfig

  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None   # Like ignore_eos: always new_tokens tokens.
  _, model_cfg, graphdef, params, _ = load_model(px)
  engine = Engine(graphdef, params, model_cfg, ServeConfig(num_slots=16))
  engine.warmup()
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, LLAMA['vocab_size'], (16, prompt_tokens)).tolist()
  print(f'\n1. palmax engine vs transformers {transformers.__version__} generate (greedy, '
        f'{prompt_tokens}-token prompts, {new_tokens} new tokens, float32, '
        f'torch threads {torch.get_num_threads()})')
  rows = {}
  for batch in (1, 16):
    ids = torch.as_tensor(prompts[:batch])

    def run_hf():
      with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, pad_token_id=0)
      return out[:, prompt_tokens:].tolist()

    def run_px():
      events = engine.generate([GenerationRequest(p, new_tokens, ignore_eos=True)
                                for p in prompts[:batch]])
      return [[e.token for e in ev] for ev in events]

    run_hf(), run_px()  # Warm both.
    t_hf, t_px, same = [], [], True
    for _ in range(rounds):
      for name, fn, acc in (('hf', run_hf, t_hf), ('px', run_px, t_px)):
        t = time.perf_counter()
        toks = fn()
        acc.append(batch * new_tokens / (time.perf_counter() - t))
        rows.setdefault((batch, name), toks)
      same &= rows[(batch, 'hf')] == rows[(batch, 'px')]
    ratio = [p / h for p, h in zip(t_px, t_hf)]
    print(f'  batch {batch:2d}: palmax {_spread(t_px)} tok/s   transformers {_spread(t_hf)} '
          f'tok/s   palmax/HF {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]'
          f'   same tokens: {same}')


class _Server:
  """The OpenAI server for workdir `px` on a free 127.0.0.1 port, in this process."""

  def __init__(self, px, slots):
    import socket
    import uvicorn
    from launch.workdir import load_completer
    from model.inference.loop import EngineLoop
    from model.inference.openai_server import OpenAIServer
    completer, self.engine = load_completer(px, serve_overrides=dict(num_slots=slots))
    self.engine.warmup()
    self.loop = EngineLoop(self.engine).start()
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      self.port = s.getsockname()[1]
    app = OpenAIServer(completer, 'tiny').app
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port,
                                                log_level='warning'))
    threading.Thread(target=self.server.run, daemon=True).start()
    while not self.server.started:
      time.sleep(0.05)

  def close(self):
    self.server.should_exit = True
    self.loop.stop()


async def _stream(client, url, prompt, max_tokens):
  """(ttft, gaps, tokens) of one streaming greedy completion (one chunk per token)."""
  body = dict(model='tiny', prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
              logprobs=0, ignore_eos=True)
  t0 = time.perf_counter()
  stamps, tokens = [], 0
  async with client.stream('POST', url, json=body, timeout=600) as r:
    async for line in r.aiter_lines():
      if line.startswith('data: {'):
        n = len(json.loads(line[6:])['choices'][0]['logprobs']['tokens'])
        if n:
          stamps.append(time.perf_counter())
          tokens += n
  return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], tokens


def bench_server(px, clients, rounds, new_tokens, prompt_tokens, prefix, seed):
  try:
    import httpx2 as httpx  # The HTTP client openai 3.x ships with (httpx's fork, same API).
  except ImportError:
    import httpx
  import numpy as np
  srv = _Server(px, clients)
  url = f'http://127.0.0.1:{srv.port}/v1/completions'
  rng = np.random.default_rng(seed + 1)
  vocab = srv.engine.vocab_limit

  async def sequential(prompts):
    async with httpx.AsyncClient() as c:
      return [await _stream(c, url, p, new_tokens) for p in prompts]

  async def concurrent(prompts):
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as c:
      return await asyncio.gather(*[_stream(c, url, p, new_tokens) for p in prompts])

  print(f'\n2. OpenAI server, {clients} concurrent streaming clients vs sequential requests '
        f'({prompt_tokens}-token prompts, {new_tokens} tokens each, greedy)')
  tput = {'sequential': [], 'concurrent': []}
  lat = {'sequential': ([], []), 'concurrent': ([], [])}
  for _ in range(rounds):
    for mode, fn in (('sequential', sequential), ('concurrent', concurrent)):
      prompts = rng.integers(3, vocab, (clients, prompt_tokens)).tolist()
      t = time.perf_counter()
      results = asyncio.run(fn(prompts))
      tput[mode].append(sum(r[2] for r in results) / (time.perf_counter() - t))
      lat[mode][0].extend(r[0] for r in results)
      lat[mode][1].extend(g for r in results for g in r[1])
  for mode in tput:
    ttft, itl = lat[mode]
    print(f'  {mode:10s}: {_spread(tput[mode])} tok/s   TTFT p50 {_pct(ttft, .5) * 1e3:.0f} ms '
          f'p99 {_pct(ttft, .99) * 1e3:.0f} ms   ITL p50 {_pct(itl, .5) * 1e3:.1f} ms '
          f'p99 {_pct(itl, .99) * 1e3:.1f} ms')
  ratio = [c / s for c, s in zip(tput['concurrent'], tput['sequential'])]
  print(f'  concurrent / sequential throughput: {statistics.median(ratio):.2f} '
        f'[{min(ratio):.2f}-{max(ratio):.2f}]')

  print(f'\n3. TTFT with a {prefix}-token shared prefix: cache hit vs fresh prefix')
  cold, warm = [], []

  async def ttft(prompt):
    async with httpx.AsyncClient() as c:
      return (await _stream(c, url, prompt, 1))[0]

  for _ in range(rounds):
    base = rng.integers(3, vocab, prefix).tolist()
    cold.append(asyncio.run(ttft(base + rng.integers(3, vocab, 16).tolist())))
    warm.append(asyncio.run(ttft(base + rng.integers(3, vocab, 16).tolist())))
  ratio = [c / w for c, w in zip(cold, warm)]
  print(f'  fresh prefix {statistics.median(cold) * 1e3:.0f} ms [{min(cold) * 1e3:.0f}-'
        f'{max(cold) * 1e3:.0f}]   cache hit {statistics.median(warm) * 1e3:.0f} ms '
        f'[{min(warm) * 1e3:.0f}-{max(warm) * 1e3:.0f}]   speed-up {statistics.median(ratio):.1f}x '
        f'[{min(ratio):.1f}-{max(ratio):.1f}]   hit rate {srv.engine.stats()["prefix_hit_rate"]:.2f}')
  srv.close()


def main(argv):
  del argv
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)        # Orbax's restore chatter.
  logging.getLogger('httpx2').setLevel(logging.WARNING)   # One line per request otherwise.
  import jax
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}  jax {jax.__version__}  '
        f'cores {os.cpu_count()}  model: {LLAMA}')
  with tempfile.TemporaryDirectory() as root:
    hf_dir, px = make_workdir(root, _SEED.value)
    bench_vs_hf(hf_dir, px, _ROUNDS.value, _NEW.value, _PROMPT.value, _SEED.value)
    bench_server(px, _CLIENTS.value, _ROUNDS.value, _NEW.value, _PROMPT.value, _PREFIX.value,
                 _SEED.value)


if __name__ == '__main__':
  from launch import errors
  errors.run(main)
