"""Shared fixtures. Tests run on CPU with 8 simulated devices so sharding can be checked."""
import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run: the pytest process, its xdist workers and
# every subprocess a test launches (they inherit the environment) reuse each other's compiled
# programs, so the many tests that train the same tiny model compile its step once. Only
# compiles over a second are kept; the directory goes when the run ends.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix='palmax-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from model.config import ModelConfig  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny_model_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, max_seq_len=64)
  base.update(overrides)
  cfg = ModelConfig(**base)
  cfg.validate()
  return cfg


def jit_apply(model):
  """A jitted functional forward (eager NNX is slow): f(tokens, cache=None, index=0)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def f(params, tokens, cache=None, index=0):
    return nnx.merge(graphdef, params)(tokens, cache, index)

  return lambda tokens, cache=None, index=0: f(params, tokens, cache, index)


def random_tokens(key, shape, vocab):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


def write_code_corpus(directory, n_docs: int = 40) -> str:
  """Small deterministic Python-like corpus of text files; returns a glob for config.data.paths."""
  import pathlib
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  for i in range(n_docs):
    body = '\n'.join(
        f'def func_{i}_{j}(x, y={j}):\n    """Return x plus {j}."""\n    if x > {i}:\n'
        f'        return x + y\n    return x * {j % 7}\n' for j in range(12))
    (d / f'doc{i:03d}.txt').write_text(f'# module {i}\nimport os\n\n{body}\n', encoding='utf-8')
  return str(d / '*.txt')


def tiny_train_config(data_glob: str, **train):
  """A full training config small enough for a few CPU steps."""
  from configs.base import get_base
  cfg = get_base()
  cfg.model.update(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=64, max_seq_len=64)
  cfg.data.update(source='text', paths=(data_glob,), seq_len=32, val_fraction=0.1)
  cfg.data.tokenizer.train_bytes = 200_000
  cfg.train.update(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3,
                   eval_batches=2, checkpoint_every=3, peak_flops=1e11, tensorboard=True,
                   async_checkpoints=False)
  cfg.train.update(train)
  cfg.sample.update(max_new_tokens=8, num_samples=2)
  return cfg


def config_file(tmp_path, **train) -> str:
  """A config file (the launcher reads files) holding `tiny_train_config` on a generated corpus."""
  glob = write_code_corpus(tmp_path / 'corpus')
  cfg = tiny_train_config(glob, **train)
  path = tmp_path / 'cfg.py'
  path.write_text(
      'import ml_collections, json\n'
      f'def get_config():\n  d = json.loads({cfg.to_json()!r})\n'
      '  d["data"]["paths"] = tuple(d["data"]["paths"])\n  return ml_collections.ConfigDict(d)\n')
  return str(path)


def tree_digest(root) -> dict:
  """{relative path: sha256} of every file under `root` (a refused run must leave it unchanged)."""
  import hashlib
  import pathlib
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """`gs://bucket/...` served from `tmp_path/bucket` with an object store's semantics (no append,
  no directories needed, no flock), through fsspec as etils.epath reaches GCS without TensorFlow.
  Orbax's own GCS path (tensorstore's network driver) is mapped to the same local directory, so
  every palmax read and write takes its remote code path while the bytes stay on this machine."""
  import fsspec
  import orbax.checkpoint as ocp
  from fsspec.implementations.local import LocalFileSystem

  root = str(tmp_path / 'fake-gcs')

  def local(path):
    path = str(path)
    return os.path.join(root, path[len('gs://'):]) if path.startswith('gs://') else path

  class FakeGCS(LocalFileSystem):
    protocol = ('gs', 'gcs')

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__(*args, auto_mkdir=True, **kwargs)   # Objects need no parent directories.

    @classmethod
    def _strip_protocol(cls, path):
      return super()._strip_protocol(local(path)).rstrip('/')

    def _open(self, path, mode='rb', **kwargs):
      if 'a' in mode:
        raise OSError(f'{path}: an object store cannot append')
      return super()._open(path, mode, **kwargs)

  for name in FakeGCS.protocol:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()
  real = ocp.CheckpointManager
  monkeypatch.setattr(ocp, 'CheckpointManager', lambda directory, *a, **k: real(local(directory), *a, **k))
  yield local
  backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A tiny model trained 3 steps on a generated corpus (checkpoint at 3), shared by the tests
  that only read it; a test that changes a workdir copies it first."""
  from train import trainer
  glob = write_code_corpus(tmp_path_factory.mktemp('trained_corpus'))
  workdir = str(tmp_path_factory.mktemp('trained') / 'w')
  trainer.train(tiny_train_config(glob, steps=3), workdir, log=lambda *_: None)
  return workdir, glob


def sft_records(n, offset=0):
  """SFT records in each supported format (chat messages, Alpaca, prompt/completion)."""
  out = []
  for i in range(offset, offset + n):
    if i % 3 == 0:
      out.append({'messages': [{'role': 'user', 'content': f'Add {i} to x.'},
                               {'role': 'assistant', 'content': f'return x + {i}'}]})
    elif i % 3 == 1:
      out.append({'instruction': f'Write func_{i}.', 'output': f'def func_{i}(x):\n    return x'})
    else:
      out.append({'prompt': f'def func_{i}(x, y={i % 5}):\n', 'completion': '    return x + y\n'})
  return out


@pytest.fixture(scope='session')
def sft_files(tmp_path_factory):
  """(train.jsonl, val.jsonl) of `sft_records`: 64 and 16 records."""
  d = tmp_path_factory.mktemp('sft')
  paths = []
  for name, recs in (('train.jsonl', sft_records(64)), ('val.jsonl', sft_records(16, offset=500))):
    (d / name).write_text(''.join(json.dumps(r) + '\n' for r in recs))
    paths.append(str(d / name))
  return paths


def preference_records(n, offset=0):
  """Preference records in each format: pairs (string prompts, and chats), 3-way rankings. The
  chosen answer is always well-formed code, the rejected one broken, so the preference is
  learnable from the responses alone."""
  out = []
  for i in range(offset, offset + n):
    good, bad = f'    return x + {i % 7}\n', f'    retur x +{i % 7}(\n'
    if i % 4 == 0:
      out.append({'prompt': [{'role': 'user', 'content': f'Add {i % 7} to x.'}],
                  'chosen': good, 'rejected': bad})
    elif i % 4 == 1:
      out.append({'prompt': f'def f{i}(x):\n', 'ranking': [good, f'    x + {i % 7}\n', bad]})
    else:
      out.append({'prompt': f'def f{i}(x):\n', 'chosen': good, 'rejected': bad})
  return out


@pytest.fixture(scope='session')
def preference_files(tmp_path_factory):
  """(train.jsonl, val.jsonl) of `preference_records`: 48 and 16 records."""
  d = tmp_path_factory.mktemp('prefs')
  paths = []
  for name, recs in (('train.jsonl', preference_records(48)),
                     ('val.jsonl', preference_records(16, offset=500))):
    (d / name).write_text(''.join(json.dumps(r) + '\n' for r in recs))
    paths.append(str(d / name))
  return paths
