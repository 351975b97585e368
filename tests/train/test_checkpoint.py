"""Verified checkpoints: manifests written at save, corrupt steps refused or skipped, readers too."""
import hashlib
import json
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import checkpoint_stream as cs
from train import checkpoint_verify as cv
from train.checkpoint import CheckpointCorruptError


def _state(seed: int) -> dict:
  """A small train-state-like pytree on one device: arrays of several shapes and dtypes."""
  k = jax.random.split(jax.random.key(seed), 4)
  dev = jax.devices()[0]
  params = {'embed': jax.random.normal(k[0], (64, 32)),
            'mlp': {'w': jax.random.normal(k[1], (256, 96)),   # The largest array.
                    'b': jax.random.normal(k[2], (7,)).astype(jnp.bfloat16)}}
  tree = {'params': params,
          'opt_state': {'mu': jax.tree.map(lambda x: 0.5 * x, params)},
          'step': jnp.int32(seed), 'rng': jax.random.key_data(k[3])}
  return jax.device_put(tree, dev)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_hash(root: str) -> str:
  """Digest of every directory and file (names and bytes) under `root`."""
  h = hashlib.sha256()
  for d, dirs, files in os.walk(root):
    dirs.sort()
    h.update(os.path.relpath(d, root).encode() + b'/\0')
    for name in sorted(files):
      p = os.path.join(d, name)
      h.update(os.path.relpath(p, root).encode() + b'\0')
      with open(p, 'rb') as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def _save(workdir: str, steps=(10, 20), async_save=True) -> dict:
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=async_save)
  states = {}
  for s in steps:
    states[s] = _state(s)
    assert ckpt.save(s, states[s], {'step': s, 'model': {'d': 32}}, force=True)
  ckpt.close()
  return states


def _step_files(workdir: str, step: int) -> list[str]:
  """Files of a step that its manifest covers, relative to the step directory."""
  return sorted(cv._step_files(os.path.join(workdir, 'checkpoints', str(step))))


def _largest(workdir: str, step: int) -> str:
  d = os.path.join(workdir, 'checkpoints', str(step))
  return max(_step_files(workdir, step), key=lambda r: os.path.getsize(os.path.join(d, r)))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A pristine workdir with steps 10 and 20 (async saves); tests copy it before damaging it."""
  workdir = str(tmp_path_factory.mktemp('saved') / 'w')
  return workdir, _save(workdir)


def _copy(saved, tmp_path) -> str:
  workdir = str(tmp_path / 'w')
  shutil.copytree(saved[0], workdir)
  return workdir


@pytest.mark.parametrize('async_save', [True, False])
def test_save_writes_manifest_and_restore_is_exact(tmp_path, async_save):
  workdir = str(tmp_path / 'w')
  states = _save(workdir, async_save=async_save)
  for step in (10, 20):
    d = os.path.join(workdir, 'checkpoints', str(step))
    with open(os.path.join(d, cv.MANIFEST)) as f:
      manifest = json.load(f)
    assert manifest['version'] == cv.VERSION and manifest['step'] == step
    files = _step_files(workdir, step)
    assert sorted(manifest['files']) == files and any(r.startswith('state/') for r in files)
    for rel in files:
      with open(os.path.join(d, rel), 'rb') as f:
        data = f.read()
      want = {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
      assert manifest['files'][rel] == want
    assert not [n for n in os.listdir(d) if n.startswith(cv.MANIFEST + '.')]   # No temp left.
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=async_save)
  assert ckpt.verify(20) and ckpt.latest_verified_step() == 20
  logs = []
  state, record = ckpt.restore(_abstract(states[20]), log=logs.append)
  _assert_same(state, states[20])
  assert record['step'] == 20 and logs == []
  state, _ = ckpt.restore(_abstract(states[10]), step=10)
  _assert_same(state, states[10])
  # The old positional signature the trainer uses still works.
  state, record = ckpt.restore(_abstract(states[20]), None, {'model': {'d': 32}})
  assert record['step'] == 20
  ckpt.close()


def test_async_manifest_is_written_by_the_hook_before_the_step_is_listed(tmp_path, monkeypatch):
  calls = []
  real = ckpt_lib.write_manifest

  def spy(step_dir, step):
    calls.append((os.path.basename(step_dir), step, threading.current_thread() is
                  threading.main_thread(), sorted(os.listdir(step_dir))))
    return real(step_dir, step)

  monkeypatch.setattr(ckpt_lib, 'write_manifest', spy)
  workdir = str(tmp_path / 'w')
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=True)
  ckpt.save(5, _state(5), {'step': 5}, force=True)
  ckpt.wait()   # No second save: the hook of this one has written the manifest already.
  assert os.path.exists(os.path.join(workdir, 'checkpoints', '5', cv.MANIFEST))
  ckpt.close()
  # Called once, in orbax's background thread, on the finalised items of the temporary directory
  # (renamed to '5' afterwards, so a listed step always carries its manifest).
  (name, step, on_main, listing), = calls
  assert name == '5' + ckpt_lib._TMP_SUFFIX and step == 5 and not on_main
  assert {'state', 'record'} <= set(listing)
  assert ckpt_lib.Checkpointer(workdir).verify(5)


_KINDS = ['flip_largest', 'flip', 'flip', 'truncate', 'delete', 'zero', 'append', 'flip_largest',
          'truncate', 'extra']


def _corrupt(workdir: str, step: int, kind: str, rng: np.random.Generator) -> str:
  """Damages one file of `step` as `kind` says; returns its path relative to the step."""
  d = os.path.join(workdir, 'checkpoints', str(step))
  files = _step_files(workdir, step)
  rel = _largest(workdir, step) if kind == 'flip_largest' else files[rng.integers(len(files))]
  path = os.path.join(d, rel)
  size = os.path.getsize(path)
  if kind in ('flip', 'flip_largest'):
    with open(path, 'r+b') as f:
      n = min(4096, size)   # XOR up to 4 KB in the middle, at a random offset for small files.
      at = (size - n) // 2 if kind == 'flip_largest' else int(rng.integers(0, size - n + 1))
      f.seek(at)
      block = bytearray(f.read(n))
      f.seek(at)
      f.write(bytes(b ^ 0xFF for b in block))
  elif kind == 'truncate':
    os.truncate(path, int(rng.integers(0, size)))
  elif kind == 'zero':
    os.truncate(path, 0)
  elif kind == 'delete':
    os.remove(path)
  elif kind == 'append':
    with open(path, 'ab') as f:
      f.write(rng.bytes(int(rng.integers(1, 100))))
  elif kind == 'extra':
    rel = 'state/ocdbt.process_0/d/' + rng.bytes(16).hex()
    with open(os.path.join(d, rel), 'wb') as f:
      f.write(rng.bytes(300))
  return rel


def _one_line_naming(e: BaseException, step: int, rel: str | None = None) -> str:
  text = str(e)
  assert '\n' not in text and f'step {step}' in text, text
  if rel is not None:
    assert rel in text, text
  return text


@pytest.mark.parametrize('case', range(len(_KINDS)))
def test_random_corruption_is_refused_then_skipped(saved, tmp_path, case):
  rng = np.random.default_rng(1000 + case)
  kind = _KINDS[case]
  workdir = _copy(saved, tmp_path)
  rel = _corrupt(workdir, 20, kind, rng)
  before = _tree_hash(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(CheckpointCorruptError) as info:
    ckpt.restore(_abstract(saved[1][20]), on_corrupt='stop')
  _one_line_naming(info.value, 20, rel)
  assert info.value.step == 20 and info.value.path == rel
  assert _tree_hash(workdir) == before   # A refused restore changes nothing on disk.

  logs = []
  state, record = ckpt.restore(_abstract(saved[1][20]), log=logs.append)
  _assert_same(state, saved[1][10])
  assert record['step'] == 10
  corrupt_dir = os.path.join(workdir, 'checkpoints_corrupt', '20')
  (line,) = logs
  assert line.startswith('checkpoint step 20 is corrupt (') and rel in line
  assert 'falling back to step 10, the newest that verifies' in line and corrupt_dir in line
  assert os.path.isdir(corrupt_dir) and ckpt.latest_step() == 10
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  if case == 0:   # The step number is free again: saving it anew works and verifies.
    assert ckpt.save(20, saved[1][20], {'step': 20}, force=True)
    ckpt.wait()
    assert ckpt.verify(20) and ckpt.latest_verified_step() == 20
  ckpt.close()


def test_no_step_verifies(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  rng = np.random.default_rng(7)
  _corrupt(workdir, 20, 'flip_largest', rng)
  _corrupt(workdir, 10, 'truncate', rng)
  ckpt = ckpt_lib.Checkpointer(workdir)
  assert ckpt.latest_verified_step() is None
  with pytest.raises(CheckpointCorruptError) as info:
    ckpt.restore(_abstract(saved[1][20]), log=lambda _: None)
  text = _one_line_naming(info.value, 20)
  assert 'no checkpoint in' in text and 'step 10' in text
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))) == ['10', '20']
  ckpt.close()


def test_expect_is_compared_before_the_state_is_verified(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  _corrupt(workdir, 20, 'flip_largest', np.random.default_rng(0))
  before = _tree_hash(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r'model\.d=32.*model\.d=64'):
    ckpt.restore(_abstract(saved[1][20]), expect={'model': {'d': 64}})
  assert _tree_hash(workdir) == before
  ckpt.close()


def test_damaged_manifest_is_refused(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  path = os.path.join(workdir, 'checkpoints', '20', cv.MANIFEST)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointCorruptError) as info:
    cv.verify_step(os.path.join(workdir, 'checkpoints'), 20)
  _one_line_naming(info.value, 20, cv.MANIFEST)
  with open(path, 'w') as f:
    json.dump({'format': cv.FORMAT, 'version': cv.VERSION, 'files': {'state/x': {'size': 1}}}, f)
  with pytest.raises(CheckpointCorruptError, match='is malformed'):
    cv.verify_step(os.path.join(workdir, 'checkpoints'), 20)


def test_read_failure_of_a_verified_step_is_not_treated_as_corruption(saved, tmp_path):
  """Bytes that match the manifest are not corrupt: an orbax error reading them (here a train
  state of another shape) is one line, and nothing is moved, whatever on_corrupt says."""
  workdir = _copy(saved, tmp_path)
  before = _tree_hash(workdir)
  abstract = _abstract(saved[1][20])
  abstract['params']['embed'] = jax.ShapeDtypeStruct((64, 48), jnp.float32,
                                                     sharding=abstract['params']['embed'].sharding)
  ckpt = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(CheckpointCorruptError) as info:
    ckpt.restore(abstract, log=lambda _: None)
  assert 'files match its manifest' in _one_line_naming(info.value, 20)
  assert info.value.verified
  ckpt.close()
  assert _tree_hash(workdir) == before


def test_unverified_step_loads_and_verify_false(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  os.remove(os.path.join(workdir, 'checkpoints', '20', cv.MANIFEST))   # As saved before manifests.
  ckpt = ckpt_lib.Checkpointer(workdir)
  assert ckpt.verify(20) is False and ckpt.latest_verified_step() == 10
  logs = []
  state, _ = ckpt.restore(_abstract(saved[1][20]), log=logs.append)
  _assert_same(state, saved[1][20])
  assert len(logs) == 1 and 'restored it unverified' in logs[0]
  logs.clear()
  state, _ = ckpt.restore(_abstract(saved[1][20]), verify=False, log=logs.append)
  _assert_same(state, saved[1][20])
  assert logs == []
  ckpt.close()
  params, _ = cs.restore_params(workdir, _abstract(saved[1][20]['params']), verify=False)
  _assert_same(params, saved[1][20]['params'])


def test_unverified_unreadable_step_is_one_line(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  d = os.path.join(workdir, 'checkpoints', '20')
  os.remove(os.path.join(d, cv.MANIFEST))
  big = os.path.join(d, _largest(workdir, 20))
  os.truncate(big, os.path.getsize(big) // 2)
  ckpt = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(CheckpointCorruptError) as info:
    ckpt.restore(_abstract(saved[1][20]), on_corrupt='stop')
  assert 'could not be read' in _one_line_naming(info.value, 20)
  logs = []
  state, _ = ckpt.restore(_abstract(saved[1][20]), log=logs.append)
  _assert_same(state, saved[1][10])
  assert 'falling back to step 10' in logs[0]
  ckpt.close()


def test_readers_refuse_a_corrupt_step_in_one_line(saved, tmp_path, capfd):
  workdir = _copy(saved, tmp_path)
  # Truncate every array data file (OCDBT packs several arrays per file; the parameters are
  # in some of them, the moments in others).
  data = [r for r in _step_files(workdir, 20) if r.startswith('state/ocdbt.process_0/d/')]
  for rel in data:
    path = os.path.join(workdir, 'checkpoints', '20', rel)
    os.truncate(path, min(16, os.path.getsize(path) // 2))
  before = _tree_hash(workdir)
  abstract = _abstract(saved[1][20]['params'])
  with pytest.raises(CheckpointCorruptError) as info:
    cs.restore_params(workdir, abstract)
  assert 'pass --step=10' in _one_line_naming(info.value, 20, data[0])
  assert 'truncated' in str(info.value)
  # Unchecked, orbax reads a truncated file and fails: still one line, naming the file.
  with pytest.raises(CheckpointCorruptError) as info:
    cs.restore_params(workdir, abstract, verify=False)
  assert 'pass --step=10' in _one_line_naming(info.value, 20, data[0])
  capfd.readouterr()
  import gc
  gc.collect()
  assert 'Traceback' not in capfd.readouterr().err   # orbax's abandoned reads stay quiet.
  with pytest.raises(CheckpointCorruptError) as info:
    cs.LeafReader(workdir)
  _one_line_naming(info.value, 20, data[0])
  with pytest.raises(CheckpointCorruptError):
    cs.LeafReader(workdir, 20, verify=False).read(('params', 'mlp', 'w'), 0, 256)
  assert _tree_hash(workdir) == before   # Readers never move or write anything.
  params, record = cs.restore_params(workdir, abstract, step=10)
  _assert_same(params, saved[1][10]['params'])
  reader = cs.LeafReader(workdir, 10)
  np.testing.assert_array_equal(reader.read(('params', 'mlp', 'w'), 0, 256),
                                np.asarray(saved[1][10]['params']['mlp']['w']))


def test_save_streamed_writes_a_manifest(tmp_path):
  workdir = str(tmp_path / 'w')
  w = np.arange(48 * 8, dtype=np.float32).reshape(48, 8)
  state = {'params': {'w': cs.StreamedLeaf(w.shape, w.dtype, lambda a, b: w[a:b], name='w')},
           'opt_state': {'mu': cs.zeros_leaf((48, 8), np.float32)}, 'step': np.int32(0)}
  cs.save_streamed(workdir, 0, state, {'step': 0})
  assert cv.verify_step(os.path.join(workdir, 'checkpoints'), 0)
  reader = cs.LeafReader(workdir)
  np.testing.assert_array_equal(reader.read(('params', 'w'), 0, 48), w)


def test_resume_may_change_how_the_model_is_computed_but_not_what():
  """attention_impl and scan_layers (model.config.HOW_NOT_WHAT) may differ from the checkpoint's;
  an architectural field may not."""
  from train.checkpoint import CheckpointMismatchError, _compare
  have = {'d_model': 32, 'attention_impl': 'xla', 'scan_layers': True}
  _compare('model', have, dict(have, attention_impl='flash', scan_layers=False), '/w', 3)
  with pytest.raises(CheckpointMismatchError, match='model.d_model=32'):
    _compare('model', have, dict(have, d_model=64), '/w', 3)
