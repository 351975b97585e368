"""Tests for train/data.py and launch/compressors.py: packing, batches, resume, sharding, eval."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import compressors
from train import data as data_lib
from train.corpus import Document


def test_pack_appends_eos_after_every_doc():
  out = data_lib.pack([[5, 6], [], [7]], eos_id=1)
  assert out.dtype == np.int32 and out.tolist() == [5, 6, 1, 1, 7, 1]
  assert data_lib.pack([], eos_id=1).shape == (0,)


def test_validation_text_has_one_separator_per_doc():
  docs = [Document('a', 'x\ny'), Document('b', '\u00e9')]
  assert data_lib.validation_text(docs) == 'x\ny\n\u00e9\n'


# -- Batches ------------------------------------------------------------------------------------

TOKENS = np.arange(10 * 9 + 4, dtype=np.int32)  # 10 windows of seq_len + 1 = 9, plus 4 left over


def _take(batches, n):
  return [next(batches).copy() for _ in range(n)]


def test_batches_shapes_windows_and_epochs():
  b = data_lib.Batches(TOKENS, seq_len=8, global_batch_size=4, seed=0)
  assert b.num_windows == 10 and b.steps_per_epoch == 2.5
  first = next(b)
  assert first.shape == (4, 9) and first.dtype == np.int32
  # Every row is a whole window: consecutive ids starting at a multiple of 9.
  assert all(row[0] % 9 == 0 and (np.diff(row) == 1).all() for row in first)
  rows = np.concatenate([first] + _take(b, 4))  # 20 examples = exactly two epochs
  starts = rows[:, 0] // 9
  assert sorted(starts[:10]) == list(range(10)) and sorted(starts[10:]) == list(range(10))
  assert not (starts[:10] == starts[10:]).all()  # a new permutation each epoch
  assert b.state() == {'epoch': 2, 'index': 0, 'seed': 0, 'num_windows': 10}


def test_batches_are_deterministic_and_seeded():
  a = _take(data_lib.Batches(TOKENS, 8, 4, seed=1), 6)
  b = _take(data_lib.Batches(TOKENS, 8, 4, seed=1), 6)
  c = _take(data_lib.Batches(TOKENS, 8, 4, seed=2), 6)
  assert all((x == y).all() for x, y in zip(a, b))
  assert any((x != y).any() for x, y in zip(a, c))


def test_resume_from_state_reproduces_batches():
  b = data_lib.Batches(TOKENS, 8, 3, seed=5)
  _take(b, 4)  # mid-second epoch
  state = json.loads(json.dumps(b.state()))  # JSON round trip, as in a checkpoint
  expected = _take(b, 7)
  resumed = data_lib.Batches(TOKENS, 8, 3, seed=5)
  resumed.restore(state)
  assert all((x == y).all() for x, y in zip(expected, _take(resumed, 7)))


def test_process_shards_cover_the_global_batch():
  whole = _take(data_lib.Batches(TOKENS, 8, 4, seed=0), 3)
  shards = [_take(data_lib.Batches(TOKENS, 8, 4, seed=0, process_index=p, process_count=2), 3)
            for p in range(2)]
  for step in range(3):
    assert shards[0][step].shape == (2, 9)
    assert (np.concatenate([shards[0][step], shards[1][step]]) == whole[step]).all()


def test_batches_errors():
  with pytest.raises(ValueError, match='global_batch_size=6 must be a positive multiple of '
                                       'process_count=4'):
    data_lib.Batches(TOKENS, 8, 6, process_count=4)
  with pytest.raises(ValueError, match=r'my corpus: 5 tokens is fewer than one window.*seq_len'):
    data_lib.Batches(np.arange(5), 8, 2, name='my corpus')
  b = data_lib.Batches(TOKENS, 8, 2, seed=0)
  with pytest.raises(ValueError, match='num_windows=7.*different data'):
    b.restore({'epoch': 0, 'index': 0, 'num_windows': 7})
  with pytest.raises(ValueError, match='epoch'):
    b.restore({'index': 0})
  with pytest.raises(ValueError, match='out of range'):
    b.restore({'epoch': 0, 'index': 10})


# -- validation batches -------------------------------------------------------------------------


def test_validation_batches_cover_every_token_once():
  val = np.arange(10, 10 + 23, dtype=np.int32)
  batches = data_lib.validation_batches(val, seq_len=4, batch_size=2)
  assert len(batches) == 3  # ceil(23 / 4) = 6 windows, 2 per batch
  targets = []
  for tokens, weights in batches:
    assert tokens.shape == (2, 5) and weights.shape == (2, 4) and tokens.dtype == np.int32
    targets += tokens[:, 1:][weights > 0].tolist()
    assert (tokens[:, 1:][weights == 0] == 0).all()  # padding is pad id 0
  assert targets == val.tolist()
  assert batches[0][0][0, 0] == 1  # the stream starts with EOS so the first doc is predicted
  assert len(data_lib.validation_batches(val, 4, 2, max_batches=2)) == 2
  with pytest.raises(ValueError, match='val_fraction'):
    data_lib.validation_batches(np.zeros(0, np.int32), 4, 2)


# -- build_data end to end on a small text corpus -----------------------------------------------


def _corpus_cfg(tmp_path, n_docs=40):
  for i in range(n_docs):
    body = '\n'.join(f'    value_{i}_{j} = compute({j}, "x" * {i})' for j in range(8))
    (tmp_path / f'mod{i:02d}.py').write_text(
        f'def function_{i}(x):\n    """Doc {i}."""\n{body}\n    return x\n')
  return {'data': {'source': 'text', 'paths': [str(tmp_path / '*.py')], 'val_fraction': 0.1,
                   'seed': 0, 'max_docs': 0, 'seq_len': 32,
                   'tokenizer': {'vocab_size': 400, 'model_type': 'bpe', 'path': '',
                                 'train_bytes': 0}},
          'train': {'batch_size': 4, 'eval_batches': 0}}


def test_build_data_end_to_end_and_cache(tmp_path):
  (tmp_path / 'corpus').mkdir()
  cfg = _corpus_cfg(tmp_path / 'corpus')
  workdir = str(tmp_path / 'work')
  bundle = data_lib.build_data(cfg, workdir)
  info = bundle.info
  assert not info['tokens_cached'] and len(info['fingerprint']) == 64
  assert next(bundle.train).shape == (4, 33)
  tok = bundle.tokenizer
  # The val stream decodes back to exactly the text the compressors see.
  text = data_lib.validation_text(bundle.val_docs)
  val = np.asarray(bundle.val_tokens)
  docs = np.split(val, np.flatnonzero(val == tok.eos_id) + 1)[:-1]  # each ends with its EOS
  assert ''.join(tok.decode(ids) + '\n' for ids in docs) == text
  # bits/byte denominator: (bytes + 1 per doc) / tokens incl. EOS, i.e. validation_text bytes.
  assert bundle.val_bytes_per_token == pytest.approx(len(text.encode()) / len(bundle.val_tokens))
  weight_sum = sum(w.sum() for _, w in bundle.val)
  assert weight_sum == len(bundle.val_tokens) and bundle.val_coverage == 1.0

  again = data_lib.build_data(cfg, workdir)
  assert again.info['tokens_cached'] and again.info['fingerprint'] == info['fingerprint']
  assert (np.asarray(again.train_tokens) == np.asarray(bundle.train_tokens)).all()
  assert (next(again.train) == next(data_lib.build_data(cfg, workdir).train)).all()

  cfg['data']['seed'] = 1  # another split: new fingerprint, tokens re-made
  assert not data_lib.build_data(cfg, workdir).info['tokens_cached']


def test_build_data_sharding_and_errors(tmp_path):
  cfg = _corpus_cfg(tmp_path)
  shard = data_lib.build_data(cfg, None, process_index=1, process_count=2)
  assert next(shard.train).shape == (2, 33) and shard.val[0][0].shape == (4, 33)
  limited = data_lib.build_data(cfg, None, eval_max_batches=1)
  assert len(limited.val) == 1 and limited.val_coverage < 1.0
  with pytest.raises(ValueError, match='global batch size'):
    data_lib.build_data({'data': cfg['data']}, None)
  cfg['data']['seq_len'] = 100_000
  with pytest.raises(ValueError, match=r"data.source='text'.*training split.*fewer than one window"):
    data_lib.build_data(cfg, None)


def test_compressors_on_validation_bytes(tmp_path):
  cfg = _corpus_cfg(tmp_path)
  result = compressors.run(cfg['data'], str(tmp_path / 'work'))
  assert set(result['bits_per_byte']) == {'gzip-9', 'bz2-9', 'xz-9e'}
  assert all(0 < v < 8 for v in result['bits_per_byte'].values())
  bundle = data_lib.build_data(cfg, None)
  assert result['val_bytes_with_separators'] == len(bundle.validation_text().encode())
  with open(tmp_path / 'work' / 'compressors.json') as f:
    assert json.load(f)['fingerprint'] == bundle.info['fingerprint']
  assert math.isfinite(bundle.val_bytes_per_token)
  with pytest.raises(ValueError, match='none'):  # The CLI's exit 2 (launch/errors.py).
    compressors.run({'source': 'text', 'paths': [str(tmp_path / 'none*.txt')]})


def test_compressors_cli(tmp_path):
  """The program: absl flags through `errors.run`, same flag names as the data config."""
  cfg = _corpus_cfg(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  work = tmp_path / 'cli'
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.compressors', '--source=text',
       f'--paths={cfg["data"]["paths"][0]}', '--val_fraction=0.1', f'--workdir={work}'],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  want = compressors.run(dict(cfg['data'], val_fraction=0.1))
  with open(work / 'compressors.json') as f:
    assert json.load(f)['bits_per_byte'] == want['bits_per_byte']
  for name, bpb in want['bits_per_byte'].items():
    assert f'{name:8s} {bpb:.4f} bits/byte' in proc.stdout
