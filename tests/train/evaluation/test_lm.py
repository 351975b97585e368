"""PalmaxModel: a workdir behind the EvalModel surface (scores, rolling scores, generations)."""
import numpy as np
import pytest

from train.evaluation.lm import Generation, PalmaxModel, cut_at, rolling_windows


@pytest.mark.parametrize('n', [2, 5, 9, 10, 11, 30])
def test_rolling_windows_predict_every_token_once_within_the_context(n):
  ids = list(range(100, 100 + n))
  windows = rolling_windows(ids, max_len=4)
  assert [t for _, cont in windows for t in cont] == ids[1:]
  for ctx, cont in windows:
    assert ctx and len(cont) <= 4 and len(ctx) + len(cont) - 1 <= 4
    start = ids.index(cont[0])
    assert ctx == ids[start - len(ctx):start]       # The tokens right before.


def test_cut_at_and_generation_checks():
  assert cut_at('abc\n\ndef', ('\n\n', 'c')) == 'ab'
  assert cut_at('abc', ()) == 'abc'
  for bad, field in [(dict(max_tokens=0), 'max_tokens'), (dict(n=0), 'n'),
                     (dict(temperature=3.0), 'temperature')]:
    with pytest.raises(ValueError, match=field):
      Generation(**bad)


@pytest.fixture(scope='module')
def model(trained_workdir):
  m = PalmaxModel.load(trained_workdir[0], serve_overrides=dict(num_slots=4, max_queue=8))
  yield m
  m.close()


def _token_logprobs(model, ids):
  logits = model.scorer.logits(np.asarray([ids[:-1]]))[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return logp[np.arange(len(ids) - 1), ids[1:]]


def test_rolling_loglikelihood_equals_the_full_sequence_when_it_fits(model):
  tok = model.tokenizer
  text = 'def func_1_2(x, y=2):\n    return x'
  ids = [tok.doc_start_id] + tok.encode(text)
  assert len(ids) <= model.max_len
  (lp, n), = model.loglikelihood_rolling([text])
  assert n == len(ids) - 1
  assert lp == pytest.approx(float(_token_logprobs(model, ids).sum()), abs=1e-3)


def test_rolling_loglikelihood_of_a_long_text_sums_its_windows(model):
  tok = model.tokenizer
  text = '\n'.join(f'def func_{i}(x):\n    return x + {i}' for i in range(20))
  ids = [tok.doc_start_id] + tok.encode(text)
  assert len(ids) > 2 * model.max_len
  (lp, n), = model.loglikelihood_rolling([text])
  want = 0.0
  for ctx, cont in rolling_windows(ids, model.max_len):
    want += float(_token_logprobs(model, ctx + cont)[len(ctx) - 1:].sum())
  assert n == len(ids) - 1 and lp == pytest.approx(want, abs=1e-3)


def test_loglikelihood_keeps_the_end_of_an_overlong_context(model):
  tok = model.tokenizer
  ctx = ' '.join(f'x{i}' for i in range(200))
  cont = ' y'
  c, k = [tok.doc_start_id] + tok.encode(ctx), tok.encode(cont)
  kept = c[-(model.max_len + 1 - len(k)):]
  (got, _), = model.loglikelihood([(ctx, cont)])
  want = float(_token_logprobs(model, kept + k)[len(kept) - 1:].sum())
  assert got == pytest.approx(want, abs=1e-3)


def test_batched_loglikelihood_equals_one_at_a_time(model):
  pairs = [('def f', '(x):'), ('import', ' os'), ('x = 1', '\n'), ('a', 'b c d e')] * 3
  together = model.loglikelihood(pairs)
  for p, (lp, greedy) in zip(pairs, together):
    (alone, g), = model.loglikelihood([p])
    assert lp == pytest.approx(alone, abs=1e-4) and greedy == g


def test_generate_batched_equals_alone_and_honours_until(model):
  prompts = ['def func_1', 'import', 'class A', 'def func_3_4(x']
  gen = Generation(max_tokens=8)
  together = model.generate(prompts, gen)
  assert together == [model.generate([p], gen)[0] for p in prompts]
  cut = model.generate(prompts, Generation(max_tokens=8, until=('x',)))
  for full, short in zip(together, cut):
    assert short[0] == full[0].split('x')[0]
  sampled = model.generate(prompts[:1], Generation(max_tokens=6, temperature=1.0, n=3, seed=1))
  assert len(sampled[0]) == 3
  # More prompts than the queue (8) takes: sent in waves, nothing refused.
  assert len(model.generate(prompts * 3, gen)) == 12


def test_set_params_gives_what_a_fresh_model_gives(model, trained_workdir):
  import jax
  perturbed = jax.tree.map(lambda x: x * 1.5, model.scorer.params)
  prompts = ['def func_1', 'import os']
  gen = Generation(max_tokens=6)
  before = model.generate(prompts, gen)               # Fills the prefix cache.
  fresh = PalmaxModel.from_params(model.engine.graphdef, perturbed, model.engine.model_cfg,
                                  model.tokenizer, dict(num_slots=4, max_queue=8))
  try:
    want_gen, want_ll = fresh.generate(prompts, gen), fresh.loglikelihood([('def', ' f')])
  finally:
    fresh.close()
  original = model.scorer.params
  model.set_params(perturbed)
  try:
    assert model.generate(prompts, gen) == want_gen
    assert model.loglikelihood([('def', ' f')])[0][0] == pytest.approx(want_ll[0][0], abs=1e-5)
  finally:
    model.set_params(original)
  assert model.generate(prompts, gen) == before


@pytest.mark.slow
def test_on_the_config_mesh_scores_and_generations_equal_one_device(model, trained_workdir,
                                                                     tmp_path):
  import json
  import shutil
  workdir = str(tmp_path / 'w')
  shutil.copytree(trained_workdir[0], workdir)
  cfg_path = f'{workdir}/config.json'
  cfg = json.load(open(cfg_path))
  cfg['mesh'].update(data=-1, fsdp=2, tensor=2)     # 2 x 2 x 2 over the 8 simulated devices.
  json.dump(cfg, open(cfg_path, 'w'))
  sharded = PalmaxModel.load(workdir, serve_overrides=dict(num_slots=4, max_queue=8),
                             on_config_mesh=True)
  try:
    assert dict(sharded.engine.mesh.shape)['tensor'] == 2
    pairs = [('def f', '(x):'), ('import', ' os'), ('x = 1', '\n')] * 3
    for (a, ga), (b, gb) in zip(model.loglikelihood(pairs), sharded.loglikelihood(pairs)):
      assert a == pytest.approx(b, abs=1e-4)
    text = ['\n'.join(f'def func_{i}(x):\n    return x + {i}' for i in range(8))]
    assert sharded.loglikelihood_rolling(text)[0][0] == pytest.approx(
        model.loglikelihood_rolling(text)[0][0], abs=1e-3)
    prompts = ['def func_1', 'import', 'class A']
    gen = Generation(max_tokens=8)
    assert sharded.generate(prompts, gen) == model.generate(prompts, gen)
  finally:
    sharded.close()
