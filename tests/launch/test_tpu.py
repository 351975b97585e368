"""The Cloud TPU launcher (launch/tpu.py), run as a user would, against a fake `gcloud` first on
PATH that records its arguments and answers from a script: which states `describe` reports, in
order, and what worker 0 says about the training process. No network, no Google Cloud."""
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

from launch import gcloud

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME, ZONE, PROJECT = 'palmax-test', 'us-central2-b', 'my-project'
WHERE = [f'--zone={ZONE}', f'--project={PROJECT}']
ENV = ['--env=LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=2', '--env=TPU_STDERR_LOG_LEVEL=0']
TRAIN = (".venv/bin/python -m launch.main --config=configs/tiny.py --workdir=/mnt/ckpt/run "
         "--distributed=auto --config.train.steps=100 '--config.data.paths=(\"a b/*.txt\",)' "
         "--nosample")

# Answers the launcher's gcloud calls; a list answers one call per element, its last repeating.
FAKE_GCLOUD = r'''#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(argv) + '\n')
path = os.environ['FAKE_GCLOUD_SCRIPT']

def answer(key, default):
  with open(path) as f:
    script = json.load(f)
  seq = script.get(key) or [default]
  if len(seq) > 1:
    script[key] = seq[1:]
    with open(path + '.tmp', 'w') as f:
      json.dump(script, f)
    os.replace(path + '.tmp', path)  # The log stream reads the script at the same time.
  return seq[0]

def not_found():
  sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                   "'projects/p/locations/z/nodes/n' was not found\n")
  sys.exit(1)

verb = argv[3] if len(argv) > 3 else ''
command = next((a[len('--command='):] for a in argv if a.startswith('--command=')), '')
if verb == 'describe':
  state = answer('describe', 'READY')
  if state == 'NOT_FOUND':
    not_found()
  print(state)
elif verb == 'delete' and answer('delete', 'ok') == 'NOT_FOUND':
  not_found()
elif verb == 'ssh' and 'kill -0' in command:  # The probe of the training process.
  out = answer('probe', 'exit 0')
  if out == 'UNREACHABLE':
    sys.exit(255)
  print(out)
elif verb == 'ssh' and command.startswith('tail -n +1'):
  print('step   1/100  loss 9.1 (from the fake log)', flush=True)
'''


@pytest.fixture
def src(tmp_path):
  """A small local checkout to ship."""
  d = tmp_path / 'src'
  (d / 'configs').mkdir(parents=True)
  (d / 'configs' / 'tiny.py').write_text('# config\n')
  (d / 'runs' / 'old').mkdir(parents=True)
  (d / 'runs' / 'old' / 'ckpt').write_text('not shipped\n')
  (d / '.venv').mkdir()
  return d


def launch(tmp_path, *args, describe=(), probe=(), delete=(), timeout=30):
  """Runs `python -m launch.tpu ARGS` with the fake gcloud; returns the result and the recorded
  gcloud argv lists (without the leading 'gcloud')."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  fake = bindir / 'gcloud'
  fake.write_text(FAKE_GCLOUD.replace('{python}', sys.executable))
  fake.chmod(0o755)
  log, script = tmp_path / 'gcloud.log', tmp_path / 'script.json'
  log.unlink(missing_ok=True)
  script.write_text(json.dumps({'describe': list(describe), 'probe': list(probe),
                                'delete': list(delete)}))
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}', TMPDIR=str(tmp_path),
             FAKE_GCLOUD_LOG=str(log), FAKE_GCLOUD_SCRIPT=str(script))
  r = subprocess.run([sys.executable, '-m', 'launch.tpu', *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return r, calls


def run_args(src, *more):
  return [f'--name={NAME}', f'--zone={ZONE}', f'--project={PROJECT}', '--accelerator_type=v4-8',
          '--config=configs/tiny.py', '--workdir=/mnt/ckpt/run', f'--src={src}',
          '--poll_seconds=0', *ENV, '--config.train.steps=100',
          '--config.data.paths=("a b/*.txt",)', *more, '--', '--nosample']


def describe(group='tpu-vm'):
  fmt = 'value(state.state)' if group == 'queued-resources' else 'value(state)'
  return ['compute', 'tpus', group, 'describe', NAME, *WHERE, f'--format={fmt}']


def ssh(command, worker='all'):
  return ['compute', 'tpus', 'tpu-vm', 'ssh', NAME, *WHERE, f'--worker={worker}',
          f'--command={command}']


def start_command():
  env = "LIBTPU_INIT_ARGS='--xla_tpu_a=true --xla_tpu_b=2' TPU_STDERR_LOG_LEVEL=0"
  return ('cd palmax || exit 1; rm -f $HOME/palmax.exit $HOME/palmax.stop; (trap "" HUP; '
          f'{env} {TRAIN}; echo $? > $HOME/palmax.exit.tmp; mv $HOME/palmax.exit.tmp '
          '$HOME/palmax.exit) > $HOME/palmax.log 2>&1 < /dev/null & echo $! > $HOME/palmax.pid')


def setup_calls(tmp_path):
  return [
      ['compute', 'tpus', 'tpu-vm', 'scp', str(tmp_path / f'{NAME}-code.tar.gz'),
       f'{NAME}:palmax.tar.gz', *WHERE, '--worker=all'],
      ssh('rm -rf palmax && mkdir -p palmax && tar -xzf palmax.tar.gz -C palmax '
          '&& rm -f palmax.tar.gz'),
      ssh('cd palmax && export PATH="$HOME/.local/bin:$PATH" && (command -v uv > /dev/null || '
          'curl -LsSf https://astral.sh/uv/install.sh | sh) && uv venv -q --seed --python 3.12 '
          '.venv && .venv/bin/pip install -q -e ".[tpu]"'),
  ]


def without_log_stream(calls):
  """The log stream runs beside the probes, so its place in the record varies: drop it."""
  return [c for c in calls if not any(a.startswith('--command=tail ') for a in c)]


PROBE = ssh(gcloud.probe_command(), worker='0')
TAIL = ssh('tail -n +1 -F $HOME/palmax.log', worker='0')
CREATE = ['compute', 'tpus', 'tpu-vm', 'create', NAME, *WHERE, '--accelerator-type=v4-8',
          '--version=tpu-ubuntu2204-base']
DELETE = ['compute', 'tpus', 'tpu-vm', 'delete', NAME, *WHERE, '--quiet']


def test_dry_run_prints_every_command_and_runs_none(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src, '--dry_run', '--spot', '--delete_on_finish'))
  assert r.returncode == 0, r.stderr
  assert calls == []  # gcloud never ran.
  commands = [shlex.split(line) for line in r.stdout.splitlines() if not line.startswith('#')]
  archive = str(tmp_path / f'{NAME}-code.tar.gz')
  assert commands == [
      ['gcloud', *describe()],
      ['gcloud', *CREATE, '--spot'],
      ['gcloud', *describe()],
      ['tar', '-czf', archive, *(f'--exclude={e}' for e in gcloud.DEFAULT_EXCLUDES), '-C',
       str(src), '.'],
      *(['gcloud', *c] for c in setup_calls(tmp_path)),
      ['gcloud', *ssh(start_command())],
      ['gcloud', *TAIL],
      ['gcloud', *PROBE],
      ['gcloud', *DELETE],
  ]
  assert not os.path.exists(archive)


def test_creates_a_missing_vm_ships_installs_and_runs_on_every_worker(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src), describe=['NOT_FOUND', 'CREATING', 'READY'],
                    probe=['running', 'exit 0'])
  assert r.returncode == 0, r.stderr
  assert without_log_stream(calls) == [
      describe(), CREATE, describe(), describe(), *setup_calls(tmp_path),
      ssh(start_command()), PROBE, PROBE]
  assert calls.count(TAIL) == 1
  assert 'loss 9.1 (from the fake log)' in r.stdout and '# training finished' in r.stdout
  # The shipped archive holds the code, not virtualenvs or run outputs.
  with tarfile.open(tmp_path / f'{NAME}-code.tar.gz') as tar:
    names = tar.getnames()
  assert './configs/tiny.py' in names and not any('runs' in n or '.venv' in n for n in names)


def test_reuses_a_ready_vm_and_deletes_it_when_done(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src, '--delete_on_finish'), describe=['READY'],
                    probe=['none', 'exit 0'])
  assert r.returncode == 0, r.stderr
  assert CREATE not in calls
  assert without_log_stream(calls) == [
      describe(), PROBE, *setup_calls(tmp_path), ssh(start_command()), PROBE, DELETE]
  assert f'# reusing {NAME} (READY)' in r.stdout


def test_follows_a_run_that_is_already_going(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src), describe=['READY'], probe=['running', 'exit 0'])
  assert r.returncode == 0, r.stderr
  assert without_log_stream(calls) == [describe(), PROBE, PROBE]
  assert 'already running' in r.stdout


def test_queued_resource_is_created_and_waited_for(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src, '--queued', '--spot', '--internal_ip',
                                        '--accelerator_type=v5p-256'),
                    describe=['NOT_FOUND', 'WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'],
                    probe=['exit 0'])
  assert r.returncode == 0, r.stderr
  qr = describe('queued-resources')
  assert calls[:5] == [
      qr,
      ['compute', 'tpus', 'queued-resources', 'create', NAME, *WHERE, f'--node-id={NAME}',
       '--accelerator-type=v5p-256', '--runtime-version=v2-alpha-tpuv5', '--spot',
       '--internal-ips'],
      qr, qr, qr]
  assert '# waiting for palmax-test: WAITING_FOR_RESOURCES' in r.stdout
  assert '# waiting for palmax-test: PROVISIONING' in r.stdout
  # Every ssh and scp goes over internal IPs, on every worker for setup and start.
  remote = [c for c in calls if c[3] in ('ssh', 'scp')]
  assert all('--internal-ip' in c for c in remote)
  assert [c for c in remote if '--worker=all' in c] == [
      c[:8] + ['--internal-ip'] + c[8:] if c[3] == 'ssh' else c + ['--internal-ip']
      for c in [*setup_calls(tmp_path), ssh(start_command())]]


def test_preemption_recreates_the_vm_and_reruns_the_same_command(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src, '--spot'),
                    describe=['READY', 'PREEMPTED', 'PREEMPTED', 'CREATING', 'READY'],
                    probe=['none', 'running', 'UNREACHABLE', 'exit 0'])
  assert r.returncode == 0, r.stderr
  once = [*setup_calls(tmp_path), ssh(start_command())]
  assert without_log_stream(calls) == [
      describe(), PROBE, *once, PROBE, PROBE, describe(),       # Running, then unreachable: lost.
      describe(), DELETE, CREATE + ['--spot'], describe(), describe(), *once,  # Recreated.
      PROBE]
  assert calls.count(ssh(start_command())) == 2
  assert '# preempted: restart 1/20, resuming from the last checkpoint' in r.stdout


def test_sigterm_on_a_healthy_vm_restarts_in_place(tmp_path, src):
  r, calls = launch(tmp_path, *run_args(src), describe=['READY'],
                    probe=['none', 'exit 0\ninterrupted', 'exit 0'])
  assert r.returncode == 0, r.stderr
  assert CREATE not in calls and DELETE not in calls
  assert without_log_stream(calls) == [
      describe(), PROBE, *setup_calls(tmp_path), ssh(start_command()), PROBE,
      describe(), ssh(start_command()), PROBE]
  assert '# interrupted: restart 1/20' in r.stdout


@pytest.mark.parametrize('probe,message', [
    (['none', 'exit 0\ninterrupted'],
     'training was interrupted after 0 restarts (--max_restarts=0)'),
    (['none', 'exit 3'], 'training exited with status 3 on worker 0 of palmax-test'),
])
def test_failures_end_with_one_line(tmp_path, src, probe, message):
  r, calls = launch(tmp_path, *run_args(src, '--max_restarts=0', '--delete_on_finish'),
                    describe=['READY'], probe=probe)
  assert r.returncode == 2
  assert r.stderr.startswith(f'error: {message}'), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
  assert calls[-1] == DELETE  # --delete_on_finish deletes after a failure too.


def test_down_status_stop_logs(tmp_path):
  base = [f'--name={NAME}', f'--zone={ZONE}', f'--project={PROJECT}']
  r, calls = launch(tmp_path, *base, '--action=down')
  assert r.returncode == 0 and calls == [DELETE] and f'# deleted {NAME}' in r.stdout
  r, calls = launch(tmp_path, *base, '--action=down', '--queued', delete=['NOT_FOUND'])
  assert r.returncode == 0, r.stderr
  assert calls == [['compute', 'tpus', 'queued-resources', 'delete', NAME, *WHERE, '--force',
                    '--quiet']]
  assert 'nothing to delete' in r.stdout
  r, calls = launch(tmp_path, *base, '--action=status', describe=['READY'],
                    probe=['exit 0\ninterrupted'])
  assert r.returncode == 0 and calls == [describe(), PROBE]
  assert f'{NAME}: READY\ntraining: exit 0 (interrupted)' in r.stdout
  r, calls = launch(tmp_path, *base, '--action=stop')
  assert r.returncode == 0 and calls == [ssh(gcloud.stop_command())]
  r, calls = launch(tmp_path, *base, '--action=logs', '--worker=3')
  assert r.returncode == 0 and calls == [ssh('tail -n +1 -F $HOME/palmax.log', worker='3')]


@pytest.mark.parametrize('args,message', [
    (['--accelerator_type=v5p256'], "--accelerator_type='v5p256': expected GENERATION-SIZE"),
    (['--zone='], '--zone is required'),
    (['--env=LIBTPU_INIT_ARGS'], "bad --env entry 'LIBTPU_INIT_ARGS': expected KEY=VALUE"),
    (['--env=1X=2'], "bad --env entry '1X=2'"),
    (['--workdir=runs/x'], "--workdir='runs/x': expected an absolute path"),
    (['--config=configs/nope.py'], '--config=configs/nope.py: no such file'),
    (['--name=Bad_Name'], "--name='Bad_Name': expected a TPU VM name"),
    (['--accelerator_type=v9x-8'], 'no default TPU runtime for v9x-8; pass --runtime_version'),
    (['--action=launch'], 'error: flag --action=launch'),
])
def test_bad_input_gets_one_line_and_runs_nothing(tmp_path, src, args, message):
  r, calls = launch(tmp_path, *run_args(src, *args))
  # 2: the user's to fix (launch/errors.py), bad flags included.
  assert r.returncode == 2, r.stdout
  assert r.stderr.startswith('error: ') and message in r.stderr, r.stderr
  assert 'Traceback' not in r.stderr
  assert calls == []


def test_remote_commands_in_bash(tmp_path, src):
  """Unpack, start, probe and stop run as the workers would run them (bash, a fake home with a
  stand-in trainer): env and arguments arrive exactly, ssh returns at once, statuses read back."""
  home = tmp_path / 'home'
  home.mkdir()
  archive = tmp_path / 'code.tar.gz'
  subprocess.run(gcloud.pack(str(src), str(archive)), check=True)
  os.replace(archive, home / gcloud.ARCHIVE)
  trainer = ('import os, signal, sys, time\n'
             'print("argv", sys.argv[1:], "env", os.environ.get("LIBTPU_INIT_ARGS"), flush=True)\n'
             'def term(*_):\n'
             f'  print("Received signal 15: saved step 3. {gcloud.RESUME_MARKER}.", flush=True)\n'
             '  sys.exit(0)\n'
             'signal.signal(signal.SIGTERM, term)\n'
             'while not os.path.exists(os.path.expanduser("~/go")): time.sleep(0.02)\n'
             'sys.exit(int(os.environ.get("FAKE_EXIT", "0")))\n')

  def sh(command, **env):
    r = subprocess.run(['bash', '-c', command], cwd=home, capture_output=True, text=True,
                       timeout=10, env=dict(os.environ, HOME=str(home), **env))
    assert r.returncode == 0, r.stderr
    return r.stdout

  def log_has(text):
    for _ in range(250):
      log = home / 'palmax.log'
      if log.exists() and text in log.read_text():
        return
      time.sleep(0.02)
    raise AssertionError(f'{text!r} not in the log')

  def probe_until(want):
    for _ in range(200):
      if (out := sh(gcloud.probe_command())).split() == want.split():
        return
      time.sleep(0.02)
    raise AssertionError(f'{out!r} != {want!r}')

  sh(gcloud.unpack_command())
  code = home / gcloud.REMOTE_DIR
  assert (code / 'configs' / 'tiny.py').exists() and not (code / 'runs').exists()
  (code / 'launch').mkdir()
  (code / 'launch' / '__init__.py').write_text('')
  (code / 'launch' / 'main.py').write_text(trainer)
  (code / '.venv' / 'bin').mkdir(parents=True)
  (code / '.venv' / 'bin' / 'python').symlink_to(sys.executable)
  probe_until('none')
  env = [('LIBTPU_INIT_ARGS', "--xla_a=1 --xla_b='x y'"), ('TPU_STDERR_LOG_LEVEL', '0')]
  argv = gcloud.train_argv('configs/tiny.py', '/mnt/w', ['--config.data.paths=("a b/*",)'], [])
  t0 = time.time()
  sh(gcloud.start_command(env, argv))
  assert time.time() - t0 < 5  # Returned while training runs on.
  probe_until('running')
  log_has("argv ['--config=configs/tiny.py', '--workdir=/mnt/w', '--distributed=auto', "
          "'--config.data.paths=(\"a b/*\",)'] env --xla_a=1 --xla_b='x y'")
  sh(gcloud.stop_command())  # Once the trainer is up (a SIGTERM before would just kill it).
  probe_until('stopped')
  sh(gcloud.start_command([], argv), FAKE_EXIT='3')  # A failure...
  probe_until('running')
  (home / 'go').write_text('')
  probe_until('exit 3')
  (home / 'go').unlink()
  argv = gcloud.train_argv('configs/tiny.py', '/mnt/w3', [], [])
  sh(gcloud.start_command([], argv))  # ... and a preemption's SIGTERM.
  log_has('/mnt/w3')  # This run's trainer is up.
  subprocess.run(['pkill', '-TERM', '-P', (home / 'palmax.pid').read_text().strip()], check=True)
  probe_until('exit 0 interrupted')
  assert gcloud.Status.parse('exit 0\ninterrupted\n') == gcloud.Status('exit', 0, True)
  assert gcloud.Status.parse('') == gcloud.Status('unreachable')
