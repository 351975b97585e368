"""The sandbox on real programs: each test is bounded by the sandbox's own (small) limits."""
import os
import socket
import threading
import time

import pytest

from train.evaluation.sandbox import (Limits, Outcome, network_namespace_available, run_many,
                                      run_program)

FAST = Limits(timeout_s=5, memory_mb=256, output_bytes=4000)
LOOP = Limits(timeout_s=2, memory_mb=256, output_bytes=4000)

GOOD = '''
def add(a, b):
  return a + b

assert add(1, 2) == 3
assert add(-1, 1) == 0
'''
WRONG = GOOD.replace('return a + b', 'return a - b')


def test_correct_program_passes():
  out = run_program(GOOD, FAST)
  assert isinstance(out, Outcome) and out.status == 'passed' and out.passed, out
  assert 0 < out.seconds < FAST.timeout_s


def test_wrong_program_fails_with_the_assertion():
  out = run_program(WRONG + "assert add(2, 2) == 4, 'add(2, 2) should be 4'\n", FAST)
  assert out.status == 'failed' and not out.passed, out
  assert 'AssertionError' in out.detail and 'add(1, 2) == 3' in out.detail


def test_syntax_error_and_exit_codes_fail():
  assert run_program('def f(:\n  pass\n', FAST).status == 'failed'
  assert 'SyntaxError' in run_program('def f(:\n  pass\n', FAST).detail
  assert run_program('raise SystemExit(1)', FAST).status == 'failed'
  # Exit codes the sandbox uses for itself can't be claimed without its marker.
  assert run_program('import sys; sys.exit(3)', FAST).status == 'failed'
  assert run_program('import os; os._exit(4)', FAST).status == 'failed'
  assert run_program('import sys; sys.exit(0)', FAST).status == 'passed'


def test_runs_as_main_in_a_fresh_isolated_directory_that_is_removed(monkeypatch):
  monkeypatch.setenv('http_proxy', 'http://proxy.invalid:1')
  monkeypatch.setenv('PYTHONPATH', '/nowhere')
  src = ('import os, sys\nassert __name__ == "__main__"\nassert sys.flags.isolated\n'
         'assert not any("proxy" in k.lower() or k.startswith("PYTHON") for k in os.environ)\n'
         'assert os.environ["HOME"] == os.getcwd()\n'
         'open("scratch.txt", "w").write("ok")\nprint("CWD=" + os.getcwd())\n')
  out = run_program(src, FAST)
  assert out.status == 'passed', out
  cwd = out.detail.split('CWD=')[1].split()[0]
  assert not os.path.exists(cwd)


def _sandbox_processes():
  psutil = pytest.importorskip('psutil')
  found = []
  for p in psutil.Process().children(recursive=True):
    try:
      if 'sandbox' in ' '.join(p.cmdline()) or p.status() == psutil.STATUS_ZOMBIE:
        found.append(p)
    except psutil.NoSuchProcess:
      pass
  return found


def test_infinite_loop_times_out_promptly_and_leaves_nothing_behind():
  start = time.monotonic()
  out = run_program('while True:\n  pass\n', LOOP)
  assert out.status == 'timeout', out
  assert LOOP.timeout_s <= time.monotonic() - start < LOOP.timeout_s + 3
  assert 'wall clock' in out.detail
  # A program that would leave a sleeping child before looping is stopped at the spawn.
  out = run_program('import subprocess\nsubprocess.Popen(["sleep", "60"])\nwhile True: pass\n',
                    LOOP)
  assert out.status == 'blocked', out
  assert _sandbox_processes() == []


@pytest.mark.parametrize('src', [
    'x = bytearray(10**10)\n',
    'l = []\nwhile True:\n  l.append([0] * 10**6)\n',
])
def test_unbounded_memory_is_memory(src):
  start = time.monotonic()
  out = run_program(src, LOOP)
  assert out.status == 'memory', out
  assert time.monotonic() - start < LOOP.timeout_s + 3


@pytest.fixture
def listener():
  """A real server on 127.0.0.1 that records every connection it accepts."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen()
  server.settimeout(0.2)
  accepted, stop = [], threading.Event()

  def serve():
    while not stop.is_set():
      try:
        conn, _ = server.accept()
      except (socket.timeout, OSError):
        continue
      accepted.append(conn)
      conn.close()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  yield server.getsockname()[1], accepted
  stop.set()
  thread.join(timeout=2)
  server.close()


@pytest.mark.parametrize('template', [
    'import socket\nsocket.create_connection(("127.0.0.1", {port}), timeout=1)\n',
    'import urllib.request\nurllib.request.urlopen("http://127.0.0.1:{port}", timeout=1)\n',
    # Swallowing the error and exiting 0 still counts as blocked.
    'import socket\ntry:\n  socket.create_connection(("127.0.0.1", {port}), timeout=1)\n'
    'except Exception:\n  pass\n',
    'import os, socket\ntry:\n  socket.socket().connect(("127.0.0.1", {port}))\n'
    'except BaseException:\n  pass\nos._exit(0)\n',
])
def test_network_is_blocked(listener, template):
  port, accepted = listener
  out = run_program(template.format(port=port), FAST)
  assert out.status == 'blocked', out
  assert 'sandbox: blocked' in out.detail
  time.sleep(0.3)  # a connection that got through would be accepted by now
  assert accepted == []


def test_network_namespace_layer_when_available():
  if not network_namespace_available():
    pytest.skip('unshare --net --map-root-user does not work here; the audit hook still applies')
  # /proc/self/net is per network namespace (/sys/class/net shows the mount's, not ours).
  src = ('lines = open("/proc/self/net/dev").read().splitlines()[2:]\n'
         'print(sorted(line.split(":")[0].strip() for line in lines))\n')
  out = run_program(src, FAST)
  assert out.status == 'passed' and out.detail == "['lo']", out


@pytest.mark.parametrize('src', [
    'import os\nos.system("echo hi")\n',
    'import subprocess\nsubprocess.run(["true"])\n',
    'import os\nif os.fork() == 0:\n  os._exit(0)\n',
    'import os\nos.execv("/bin/true", ["true"])\n',
    'import os\nos.kill(os.getppid(), 0)\n',  # nor signal the evaluation run
    'import ctypes\nctypes.CDLL("libc.so.6").system(b"true")\n',
    'import _posixsubprocess\n_posixsubprocess.fork_exec()\n',
])
def test_process_spawning_is_blocked(src):
  out = run_program(src, FAST)
  assert out.status == 'blocked', out


def test_writes_outside_its_directory_are_blocked(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('keep')
  for src in [f'open({str(victim)!r}, "w").write("x")\n',
              f'import os\nos.remove({str(victim)!r})\n',
              f'import os\nos.symlink({str(victim)!r}, "link")\nopen("link", "w")\n']:
    assert run_program(src, FAST).status == 'blocked', src
  assert victim.read_text() == 'keep'
  # Its own directory (and tempfile, via TMPDIR) are fine; so is importing numpy.
  src = ('import tempfile, shutil, numpy\nwith tempfile.TemporaryDirectory() as d:\n'
         '  open(d + "/f", "w").write("1")\nopen("g", "w").write("1")\n'
         'open(1, "w", closefd=False).write("to stdout")\n')
  assert run_program(src, FAST).status == 'passed'


def test_output_flood_is_bounded():
  out = run_program('while True:\n  print("x" * 1000)\n', LOOP)
  assert out.status == 'timeout', out
  assert len(out.detail) <= LOOP.output_bytes + 200
  out = run_program('print("x" * 10**7)\nprint("done")\n', FAST)
  assert out.status == 'passed', out
  assert len(out.detail) <= FAST.output_bytes + 200
  # The traceback of a failure after a flood is still in the detail.
  out = run_program('print("x" * 10**6)\nassert 1 == 2, "after the flood"\n', FAST)
  assert out.status == 'failed' and 'after the flood' in out.detail, out


def test_run_many_preserves_order_and_runs_in_parallel():
  start = time.monotonic()
  outs = run_many([GOOD, 'while True:\n  pass\n', WRONG, GOOD], LOOP, workers=2)
  assert [o.status for o in outs] == ['passed', 'timeout', 'failed', 'passed']
  assert time.monotonic() - start < LOOP.timeout_s + 4
  assert run_many([], LOOP) == []


@pytest.mark.parametrize('kwargs, field', [
    (dict(timeout_s=0), 'timeout_s'),
    (dict(timeout_s=float('inf')), 'timeout_s'),
    (dict(memory_mb=16), 'memory_mb'),
    (dict(output_bytes=-1), 'output_bytes'),
])
def test_bad_limits_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    Limits(**kwargs)
