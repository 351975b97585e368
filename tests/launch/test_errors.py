"""launch/errors.py, the error boundary of every CLI: the user's errors end in one line and exit 2,
palmax's bugs in a traceback and a bug line (exit 1), Ctrl-C in one line (exit 130)."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import errors
from tests.launch.test_main import ROOT, _config_file

ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


def _end(capsys, exc: BaseException):
  """(exit code, stderr) of a CLI whose body raises `exc`."""
  with pytest.raises(SystemExit) as e:
    with errors.boundary():
      raise exc
  return e.value.code, capsys.readouterr().err


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
  try:
    try:
      raise cause
    except BaseException as c:
      raise outer from c
  except BaseException as e:
    return e


@pytest.mark.parametrize('exc,line', [
    (PermissionError(errno.EACCES, 'Permission denied', '/data/w/metrics.jsonl'),
     'permission denied: /data/w/metrics.jsonl'),
    (OSError(errno.EROFS, 'Read-only file system', '/mnt/ro/w'), 'read-only file system: /mnt/ro/w'),
    (NotADirectoryError(errno.ENOTDIR, 'Not a directory', '/a/file/x'), 'not a directory: /a/file/x'),
    (IsADirectoryError(errno.EISDIR, 'Is a directory', '/a/dir'), 'is a directory: /a/dir'),
    (FileExistsError(errno.EEXIST, 'File exists', '/a/b', None, '/a/c'), 'file exists: /a/b -> /a/c'),
    (FileNotFoundError(errno.ENOENT, 'No such file or directory', '/w/config.json'),
     'no such file or directory: /w/config.json'),
    (FileNotFoundError('no checkpoint in /w/checkpoints'), 'no checkpoint in /w/checkpoints'),
    (ValueError('config.data.paths: glob pattern\n  matches no files'),
     'config.data.paths: glob pattern matches no files'),
    (OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints/6.orbax-checkpoint-tmp'),
     'no space left on device writing /w/checkpoints/6.orbax-checkpoint-tmp'),
    # An async checkpoint's failure surfaces at the next save, wrapped: still the full disk.
    (_chained(RuntimeError('background save failed'),
              OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints/9/state/d/x')),
     'no space left on device writing /w/checkpoints/9/state/d/x'),
    # tensorstore (orbax's array writer) names the file in its message.
    (ValueError('Error writing local file "/w/checkpoints/3/state/d/1a2b": [RESOURCE_EXHAUSTED] '
                "No space left on device [source locations='tensorstore/kvstore/file/file.cc:1']"),
     'no space left on device writing /w/checkpoints/3/state/d/1a2b'),
    (_chained(RuntimeError('commit failed'), PermissionError(errno.EACCES, 'Permission denied', '/w')),
     'permission denied: /w'),
])
def test_user_errors_end_in_one_line_and_exit_2(capsys, monkeypatch, exc, line):
  monkeypatch.delenv('PALMAX_TRACEBACK', raising=False)
  code, err = _end(capsys, exc)
  assert (code, err) == (2, f'error: {line}\n')


def test_palmax_error_classes_are_user_errors(capsys):
  from model.config import ConfigError
  from train.trainer import TrainingDivergedError
  assert _end(capsys, ConfigError('config.model.num_heads=4 must be ...')) == (
      2, 'error: config.model.num_heads=4 must be ...\n')
  code, err = _end(capsys, TrainingDivergedError('loss became non-finite at step 7'))
  assert (code, err) == (2, 'error: loss became non-finite at step 7\n')


def test_palmax_traceback_shows_the_traceback_of_user_errors(capsys, monkeypatch):
  monkeypatch.setenv('PALMAX_TRACEBACK', '1')
  code, err = _end(capsys, ValueError('bad value'))
  assert code == 2 and err.startswith('Traceback') and err.endswith('\nerror: bad value\n')


def test_an_unexpected_exception_is_a_bug_with_its_traceback(capsys):
  code, err = _end(capsys, RuntimeError('boom'))
  lines = err.strip().splitlines()
  assert code == 1 and lines[0] == 'Traceback (most recent call last):'
  assert 'RuntimeError: boom' in lines and 'bug in palmax' in lines[-1]


def test_errors_in_the_users_config_code_name_file_and_line(capsys, tmp_path):
  path = str(tmp_path / 'my_cfg.py')
  with pytest.raises(SyntaxError) as e:
    compile('def get_config(:\n  pass\n', path, 'exec')
  assert _end(capsys, e.value) == (2, f'error: {path} line 1: invalid syntax: def get_config(:\n')
  namespace = {}
  exec(compile('def get_config():\n  return undefined_name\n', path, 'exec'), namespace)
  with pytest.raises(NameError) as e:
    namespace['get_config']()
  assert _end(capsys, e.value) == (
      2, f"error: {path} line 2: NameError: name 'undefined_name' is not defined\n")


def test_ctrl_c_is_one_line_exit_130(capsys):
  old = signal.getsignal(signal.SIGINT)
  try:
    assert _end(capsys, KeyboardInterrupt()) == (130, 'interrupted\n')
  finally:
    signal.signal(signal.SIGINT, old)   # The boundary made a further Ctrl-C exit at once.


def test_importing_the_boundary_does_not_import_jax():
  r = subprocess.run([sys.executable, '-c', 'import sys, launch.errors, launch.main; '
                      'print("jax" in sys.modules)'], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.stdout.strip() == 'False', r.stderr


def test_check_workdir_names_the_path_and_leaves_nothing_behind(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('x')
  before = sorted(os.listdir(tmp_path))
  for path, message in [
      (tmp_path / 'file', f'--workdir={tmp_path / "file"} is a file, not a directory'),
      (tmp_path / 'file' / 'w', f'--workdir={tmp_path / "file" / "w"} cannot be created: its '
                                f'parent {tmp_path / "file"} is a file, not a directory'),
      # Not writable even by root (permission bits do not stop root; /proc does).
      ('/proc', '--workdir=/proc is not writable: creating a file in it failed'),
      ('/proc/palmax-test/w', '--workdir=/proc/palmax-test/w cannot be created: its parent /proc '
                              'is not writable'),
  ]:
    with pytest.raises(errors.PathError) as e:
      errors.check_workdir(str(path))
    assert str(e.value).startswith(message), (str(e.value), message)
  assert errors.check_workdir(str(tmp_path / 'new' / 'w')) == str(tmp_path / 'new' / 'w')
  assert errors.check_workdir(str(tmp_path)) == str(tmp_path)
  assert sorted(os.listdir(tmp_path)) == before   # No probe file left, nothing created.
  monkeypatch.setattr(os, 'access', lambda *a: False)   # A read-only mount, or chmod a-w.
  with pytest.raises(errors.PathError, match=r'is not writable \(permission denied or a '
                                             r'read-only filesystem\)'):
    errors.check_workdir(str(tmp_path))


# End to end: `python -m launch.main`, as a user runs it.

def _main(tmp_path, *args, patch: str = '', **popen):
  """`python -m launch.main ARGS`, after running `patch` (Python) in the same process."""
  code = (f'{patch}\nimport runpy, sys\nsys.argv = ["launch.main", *{list(args)!r}]\n'
          'runpy.run_module("launch.main", run_name="__main__", alter_sys=True)\n')
  return subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _checkpoints(workdir) -> list[str]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.slow
def test_bad_paths_get_one_line_before_any_work(tmp_path):
  (tmp_path / 'bad.py').write_text('def get_config(:\n  return None\n')
  (tmp_path / 'file').write_text('x')
  tiny, w = os.path.join(ROOT, 'configs', 'tiny.py'), str(tmp_path / 'w')
  for args, line in [
      ([f'--config={tmp_path / "nope.py"}', f'--workdir={w}'],
       f'error: cannot load config file {tmp_path / "nope.py"}: No such file or directory'),
      ([f'--config={tmp_path / "bad.py"}', f'--workdir={w}'],
       f'error: {tmp_path / "bad.py"} line 1: invalid syntax: def get_config(:'),
      ([f'--config={tiny}', f'--workdir={tmp_path / "file"}'],
       f'error: --workdir={tmp_path / "file"} is a file, not a directory'),
      ([f'--config={tiny}', '--workdir=/proc/palmax-test/w'],
       'error: --workdir=/proc/palmax-test/w cannot be created: its parent /proc is not writable: '
       'creating a file in it failed'),
  ]:
    p = _main(tmp_path, *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err
    assert not os.path.exists(w)


@pytest.mark.slow
def test_ctrl_c_during_compilation_exits_130_quietly(tmp_path):
  cfg, workdir = _config_file(tmp_path), str(tmp_path / 'w')
  # Compiles fresh programs in place of the first thing training does (before its own Ctrl-C
  # handler exists), so that the signal lands during JAX compilation.
  patch = (
      'import time, jax, jax.numpy as jnp\n'
      'from model.config import ModelConfig\n'
      'real = ModelConfig.__dict__["from_dict"].__func__\n'
      'def from_dict(cls, d):\n'
      '  print("compiling", flush=True)\n'
      '  for i in range(2000):\n'
      '    jax.jit(lambda x: x * 2 + 1)(jnp.ones(64 + i)).block_until_ready()\n'
      '  return real(cls, d)\n'
      'ModelConfig.from_dict = classmethod(from_dict)\n')
  p = _main(tmp_path, f'--config={cfg}', f'--workdir={workdir}', patch=patch)
  assert p.stdout.readline() == 'compiling\n', p.communicate()[1]
  time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 130, err
  assert err.strip().splitlines() == ['interrupted'], err
  assert 'Model:' not in out and _checkpoints(workdir) == []


@pytest.mark.slow
def test_second_ctrl_c_during_the_save_exits_130_quietly(tmp_path):
  cfg = _config_file(tmp_path, steps=100000, eval_every=0, checkpoint_every=0, log_every=1)
  workdir = str(tmp_path / 'w')
  patch = ('import time\nfrom train import checkpoint\nreal = checkpoint.Checkpointer.save\n'
           'def save(self, *a, **k):\n  print("saving", flush=True)\n  time.sleep(60)  # A big one.\n'
           '  return real(self, *a, **k)\ncheckpoint.Checkpointer.save = save\n')
  p = _main(tmp_path, f'--config={cfg}', f'--workdir={workdir}', patch=patch)
  out, t0 = [], None
  for line in p.stdout:   # The first Ctrl-C once training is under way: save and stop...
    out.append(line)
    if '/100000' in line and len([x for x in out if '/100000' in x]) == 1:
      p.send_signal(signal.SIGINT)   # Once: more progress lines may come before the save starts.
    if line == 'saving\n':   # ...the second while that save runs: stop now.
      t0 = time.time()
      p.send_signal(signal.SIGINT)
      break
  rest, err = p.communicate(timeout=60)
  assert p.returncode == 130 and t0 is not None, ''.join(out) + rest + err
  assert time.time() - t0 < 30   # Did not wait for the save.
  assert err.strip().splitlines() == ['interrupted'], err
  assert 'saved step' not in rest and 'samples from' not in rest


@pytest.mark.slow
def test_full_disk_ends_in_one_line_naming_the_intact_checkpoint(tmp_path):
  cfg, workdir = _config_file(tmp_path), str(tmp_path / 'w')   # 6 steps, checkpoints every 3.
  patch = ('import errno, os\nfrom train import checkpoint\nreal = checkpoint.Checkpointer.save\n'
           'def save(self, step, *a, **k):\n  if step > 3:\n'
           '    raise OSError(errno.ENOSPC, "No space left on device",\n'
           '                  os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp"))\n'
           '  return real(self, step, *a, **k)\ncheckpoint.Checkpointer.save = save\n')
  p = _main(tmp_path, f'--config={cfg}', f'--workdir={workdir}', patch=patch)
  out, err = p.communicate(timeout=300)
  ckpts = os.path.join(workdir, 'checkpoints')
  assert p.returncode == 2, out + err
  assert err.strip().splitlines() == [
      f'error: no space left on device writing {ckpts}/6.orbax-checkpoint-tmp; the last complete '
      f'checkpoint (step 3) in {ckpts} is intact: free some space and run the same command again '
      'to resume from it'], err
  assert 'step      3/6' in out and 'samples from' not in out
  assert '3' in _checkpoints(workdir)
