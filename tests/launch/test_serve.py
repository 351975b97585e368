"""`python -m launch.serve` run as a user would: a subprocess serving a trained workdir to the
`openai` client, and refusing a bad workdir or serving setting in one line."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip('openai')
try:
  import httpx
except ImportError:  # This venv's openai client ships the httpx2 fork (same API).
  httpx = pytest.importorskip('httpx2')

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_serve_answers_the_openai_client_and_stops_on_sigterm(trained_workdir, tmp_path):
  workdir = trained_workdir[0]
  port = free_port()
  log_path = tmp_path / 'serve.log'
  with open(log_path, 'w') as log:
    p = subprocess.Popen([sys.executable, '-m', 'launch.serve', f'--workdir={workdir}',
                          f'--port={port}', '--num_slots=2'], cwd=ROOT,
                         env=dict(ENV, PALMAX_API_KEY='sk-from-env'), stdout=log,
                         stderr=subprocess.STDOUT, text=True)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 180
    while True:
      assert p.poll() is None, f'launch.serve exited {p.returncode}:\n{log_path.read_text()}'
      assert time.monotonic() < deadline, f'no /health in 180 s:\n{log_path.read_text()}'
      try:
        health = httpx.get(f'{url}/health', timeout=2)
        if health.status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    assert health.json()['slots'] == 2   # --num_slots reached the engine
    name = os.path.basename(workdir)     # the default --model_name
    client = openai.OpenAI(base_url=f'{url}/v1', api_key='sk-from-env', max_retries=0,
                           timeout=120)
    assert [m.id for m in client.models.list().data] == [name]
    r = client.completions.create(model=name, prompt='def f', max_tokens=5, temperature=0,
                                  extra_body={'ignore_eos': True})
    assert r.usage.completion_tokens == 5 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason == 'length'
    chat = client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': 'x'}],
                                          max_tokens=3, temperature=0)
    assert chat.choices[0].message.role == 'assistant'
    # $PALMAX_API_KEY guards the API.
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=f'{url}/v1', api_key='wrong', max_retries=0).models.list()
    # uvicorn shuts down gracefully, then re-raises the signal (-SIGTERM: a clean stop to
    # systemd and Kubernetes).
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) in (0, -signal.SIGTERM), log_path.read_text()
  finally:
    if p.poll() is None:
      p.kill()
      p.wait(30)
  out = log_path.read_text()
  assert f"serving {name!r} on http://127.0.0.1:{port}/v1 (2 slots" in out
  assert 'Traceback' not in out


@pytest.mark.parametrize('args,message', [
    (['--workdir={tmp}/missing'], '{tmp}/missing/config.json not found: --workdir must be a '
     'palmax training workdir'),
    (['--workdir={workdir}', '--num_slots=0'], 'config.serve.num_slots=0 must be >= 1'),
    ([], 'Flag --workdir must have a value other than None'),
], ids=['missing-workdir', 'bad-num_slots', 'no-workdir'])
def test_bad_setting_is_one_line(trained_workdir, tmp_path, args, message):
  fill = lambda s: s.format(tmp=tmp_path, workdir=trained_workdir[0])
  r = subprocess.run([sys.executable, '-m', 'launch.serve', *map(fill, args),
                      f'--port={free_port()}'], cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=300)
  check_one_line_error(r, fill(message))


def test_port_in_use_is_refused_before_loading(trained_workdir):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    r = subprocess.run([sys.executable, '-m', 'launch.serve', f'--workdir={trained_workdir[0]}',
                        f'--port={port}'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
  check_one_line_error(r, f'--host=127.0.0.1 --port={port}: cannot listen there: ')
  assert 'in use' in r.stderr and 'compiling' not in r.stdout   # (refused before loading)


def check_one_line_error(r, message):
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith('error: ') and message in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr
  assert 'serving' not in r.stdout
