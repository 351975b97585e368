r"""Train on a Cloud TPU VM: create or reuse it, ship the code, install, run on every worker, follow
the logs, and survive preemptions by recreating the VM and rerunning the same command (training
resumes from the workdir's last checkpoint).

  python -m launch.tpu --name=palmax-v4 --zone=us-central2-b --accelerator_type=v4-8 \
      --config=configs/tiny.py --workdir=/mnt/ckpt/tiny [--config.train.steps=100 ...] --dry_run

Actions (--action): run (default: up, setup, start, follow), up (create or reuse, wait until
READY), setup (up, then ship code and install), logs (follow worker 0's log), status, stop (SIGTERM
the training: it saves a checkpoint and exits), down (delete the VM or queued resource).
--dry_run prints every command instead of running it. Arguments after `--` go to launch.main.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import flags

from launch import gcloud
from launch.gcloud import LaunchError

_ACTIONS = ['run', 'up', 'setup', 'logs', 'status', 'stop', 'down']
_ACTION = flags.DEFINE_enum('action', 'run', _ACTIONS, 'What to do; see the module docstring.')
_NAME = flags.DEFINE_string('name', None, 'TPU VM (and queued resource) name.')
_ZONE = flags.DEFINE_string('zone', None, 'Zone, e.g. us-central2-b (v4), us-east5-a (v5p).')
_PROJECT = flags.DEFINE_string('project', None, 'Google Cloud project (default: gcloud config).')
_ACCELERATOR = flags.DEFINE_string('accelerator_type', None, 'e.g. v4-8, v5p-256, v5litepod-16.')
_RUNTIME = flags.DEFINE_string('runtime_version', None,
                               'TPU software version (default: the one for the TPU generation).')
_SPOT = flags.DEFINE_bool('spot', False, 'Spot capacity: cheaper, can be preempted at any time.')
_QUEUED = flags.DEFINE_bool('queued', False, 'Request through queued resources; waits for ACTIVE.')
_INTERNAL_IP = flags.DEFINE_bool('internal_ip', False, 'No external IPs; ssh over internal IPs.')
_REPO = flags.DEFINE_string('repo', None, 'git URL to clone on the workers (default: copy --src).')
_REF = flags.DEFINE_string('ref', None, 'Branch, tag or commit to check out after --repo clone.')
_SRC = flags.DEFINE_string('src', os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'Local checkout to copy when --repo is not given.')
_EXCLUDE = flags.DEFINE_multi_string('exclude', [], 'More tar --exclude patterns for --src.')
_PYTHON = flags.DEFINE_string('python', '3.12', 'Python version of the virtualenv on the workers.')
_REMOTE_SETUP = flags.DEFINE_string('remote_setup', None,
                                    'Shell command run on every worker after install, e.g. to '
                                    'mount a shared disk for the workdir.')
_CONFIG = flags.DEFINE_string('config', None, 'Training config, relative to the code, e.g. '
                              'configs/palm_8b.py. --config.a.b=v overrides pass through.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir on the workers; it must outlive the VM '
                               'for resuming after a preemption: a bucket URL (gs://bucket/run) '
                               'or a mounted bucket or shared disk.')
_ENV = flags.DEFINE_multi_string('env', [], 'KEY=VALUE for the training process (repeatable).')
_MAX_RESTARTS = flags.DEFINE_integer('max_restarts', 20, 'Restarts after preemption, at most.')
_POLL = flags.DEFINE_float('poll_seconds', 60.0, 'Seconds between state checks.')
_WORKER = flags.DEFINE_string('worker', '0', '--action=logs: which worker log to follow.')
_DELETE = flags.DEFINE_bool('delete_on_finish', False,
                            'Delete the VM when training ends (success or failure).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print every command instead of running it.')


def say(msg: str) -> None:
  print(f'# {msg}', flush=True)


class Cloud:
  """Runs the launcher's commands for one TPU VM; DryCloud prints them instead."""

  def __init__(self, t: gcloud.Target, poll_seconds: float):
    self.t = t
    self.poll_seconds = poll_seconds

  def run(self, argv, capture=False, check=True, echo=True) -> subprocess.CompletedProcess:
    if echo:
      print('+ ' + gcloud.display(argv), flush=True)
    try:
      r = subprocess.run(argv, capture_output=capture, text=True)
    except FileNotFoundError:
      raise LaunchError(f'{argv[0]} not found on PATH (install the Google Cloud CLI)') from None
    if check and r.returncode:
      last = (r.stderr or '').strip().splitlines()[-1:] if capture else []
      raise LaunchError(f'exit {r.returncode} from: {shlex.join(argv)}'
                        + (f' ({last[0]})' if last else ''))
    return r

  def popen(self, argv):
    print('+ ' + gcloud.display(argv), flush=True)
    return subprocess.Popen(argv)

  def sleep(self):
    time.sleep(self.poll_seconds)

  def state(self) -> str | None:
    """The VM's (or queued resource's) state; None when it does not exist."""
    r = self.run(gcloud.describe(self.t), capture=True, check=False, echo=False)
    if r.returncode:
      if 'NOT_FOUND' in r.stderr:
        return None
      raise LaunchError(f'cannot describe {self.t.name}: '
                        + (r.stderr.strip().splitlines() or ['no output'])[-1])
    return r.stdout.strip()

  def status(self) -> gcloud.Status:
    r = self.run(gcloud.ssh(self.t, gcloud.probe_command(), worker='0'), capture=True,
                 check=False, echo=False)
    return gcloud.Status.parse(r.stdout) if r.returncode == 0 else gcloud.Status('unreachable')

  def ssh(self, command: str, worker: str = 'all'):
    return self.run(gcloud.ssh(self.t, command, worker))


class DryCloud(Cloud):
  """Prints each command; answers as a VM that does not exist yet and a run that succeeds."""

  def __init__(self, t, poll_seconds):
    super().__init__(t, poll_seconds)
    self.described = self.started = False

  def run(self, argv, capture=False, check=True, echo=True):
    print(gcloud.display(argv), flush=True)
    return subprocess.CompletedProcess(argv, 0, '', '')

  def popen(self, argv):
    print(gcloud.display(argv), flush=True)
    return None

  def sleep(self):
    pass

  def state(self):
    print(gcloud.display(gcloud.describe(self.t)), flush=True)
    found, self.described = self.described, True
    return self.t.ready_state if found else None

  def status(self):
    print(gcloud.display(gcloud.ssh(self.t, gcloud.probe_command(), worker='0')), flush=True)
    return gcloud.Status('exit', 0) if self.started else gcloud.Status('none')


@dataclasses.dataclass
class Job:
  """Everything about the run that is not about the VM."""
  accelerator_type: str
  runtime_version: str
  spot: bool
  src: str
  repo: str | None
  ref: str | None
  excludes: tuple[str, ...]
  python: str
  remote_setup: str | None
  env: list[tuple[str, str]]
  train_argv: list[str]
  max_restarts: int
  delete_on_finish: bool


def up(c: Cloud, job: Job) -> bool:
  """Creates the VM unless a usable one exists, and waits until it is READY (ACTIVE for queued
  resources). Returns whether it was (re)created, i.e. needs the code and install again."""
  t = c.t
  state = c.state()
  if state in t.lost_states:
    say(f'{t.name} is {state}: deleting it to create it again')
    c.run(gcloud.delete(t))
    state = None
  if state in gcloud.QUEUED_FAILED:
    see = shlex.join(gcloud.describe(t)[:-1])
    raise LaunchError(f'queued resource {t.name} is FAILED (see `{see}`); delete it with '
                      '--action=down and try again')
  if state == t.ready_state:
    say(f'reusing {t.name} ({state})')
    return False
  if state is None:
    say(f'{t.name} not found: creating it')
    c.run(gcloud.create(t, job.accelerator_type, job.runtime_version, job.spot))
  say(f'waiting until {t.name} is {t.ready_state}')
  seen = state
  while (state := c.state()) != t.ready_state:
    if state is None or state in t.lost_states | gcloud.QUEUED_FAILED:
      raise LaunchError(f'{t.name} is {state or "gone"} while waiting for {t.ready_state}')
    if state != seen:
      say(f'waiting for {t.name}: {state}')
      seen = state
    c.sleep()
  return True


def setup(c: Cloud, job: Job) -> None:
  """Ships the code to every worker and installs palmax[tpu] in a virtualenv there."""
  if job.repo:
    c.ssh(gcloud.clone_command(job.repo, job.ref))
  else:
    archive = os.path.join(tempfile.gettempdir(), f'{c.t.name}-code.tar.gz')
    c.run(gcloud.pack(job.src, archive, job.excludes))
    c.run(gcloud.scp(c.t, archive, gcloud.ARCHIVE))
    c.ssh(gcloud.unpack_command())
  c.ssh(gcloud.install_command(job.python))
  if job.remote_setup:
    c.ssh(job.remote_setup)


def start(c: Cloud, job: Job) -> None:
  c.ssh(gcloud.start_command(job.env, job.train_argv))
  if isinstance(c, DryCloud):
    c.started = True


def follow(c: Cloud) -> tuple[str, gcloud.Status]:
  """Streams worker 0's log until training ends. Returns ('done' | 'stopped' | 'failed' |
  'interrupted' | 'lost', status): 'lost' means the VM was preempted or deleted."""
  stream = c.popen(gcloud.ssh(c.t, gcloud.tail_command(), worker='0'))
  unreachable = 0
  try:
    while True:
      c.sleep()
      if stream is not None and stream.poll() is not None:  # ssh dropped: reconnect, new lines.
        stream = c.popen(gcloud.ssh(c.t, gcloud.tail_command(from_start=False), worker='0'))
      s = c.status()
      if s.kind == 'running':
        unreachable = 0
        continue
      if s.kind == 'stopped':
        return 'stopped', s
      if s.kind == 'exit' and s.code == 0:
        return ('interrupted' if s.interrupted else 'done'), s
      if c.state() != c.t.ready_state:
        return 'lost', s
      if s.kind == 'unreachable':
        unreachable += 1
        if unreachable >= 10:
          raise LaunchError(f'worker 0 of {c.t.name} unreachable by ssh for {unreachable} checks')
        continue
      if s.kind == 'exit':  # A failure, unless the VM turns out to be going away.
        c.sleep()
        return ('lost' if c.state() != c.t.ready_state else
                'interrupted' if s.interrupted else 'failed'), s
      return 'interrupted', s  # 'none': the process vanished without an exit status.
  finally:
    if stream is not None:
      time.sleep(min(c.poll_seconds, 2.0))  # Let the last lines arrive.
      stream.terminate()
      stream.wait()


def watch(c: Cloud, job: Job) -> tuple[str, gcloud.Status]:
  """Follows training, restarting it after preemptions and interruptions: on a VM that was
  lost, after creating it again and setting it up. The command is always the same one, and it
  resumes from the workdir's last checkpoint."""
  restarts = 0
  while True:
    outcome, s = follow(c)
    if outcome in ('done', 'stopped', 'failed'):
      return outcome, s
    if restarts >= job.max_restarts:
      raise LaunchError(f'training {"lost its VM" if outcome == "lost" else "was interrupted"} '
                        f'after {restarts} restarts (--max_restarts={job.max_restarts})')
    restarts += 1
    say(f'{"preempted" if outcome == "lost" else "interrupted"}: restart {restarts}/'
        f'{job.max_restarts}, resuming from the last checkpoint in the workdir')
    if up(c, job):
      setup(c, job)
    start(c, job)


def run(c: Cloud, job: Job) -> int:
  if not up(c, job) and c.status().kind == 'running':
    say(f'training is already running on {c.t.name}: following it')
  else:
    setup(c, job)
    start(c, job)
  try:
    outcome, s = watch(c, job)
  except LaunchError:
    if job.delete_on_finish:  # Not on Ctrl-C (KeyboardInterrupt): training goes on there.
      c.run(gcloud.delete(c.t))
    raise
  if isinstance(c, DryCloud):
    say(f'on preemption: delete, then the same commands from create on (at most '
        f'--max_restarts={job.max_restarts} times)')
  if job.delete_on_finish:
    c.run(gcloud.delete(c.t))
  if outcome == 'failed':
    raise LaunchError(f'training exited with status {s.code} on worker 0 of {c.t.name}; its log '
                      f'is {gcloud.LOG} on each worker (--action=logs --worker=N)')
  say('training stopped (--action=stop)' if outcome == 'stopped' else 'training finished')
  return 0


def down(c: Cloud) -> int:
  r = c.run(gcloud.delete(c.t), capture=True, check=False)
  if r.returncode and 'NOT_FOUND' in r.stderr:
    say(f'{c.t.name} does not exist: nothing to delete')
  elif r.returncode:
    raise LaunchError(f'deleting {c.t.name} failed: ' + (r.stderr.strip().splitlines() or [''])[-1])
  else:
    say(f'deleted {c.t.name}')
  return 0


def _job() -> Job:
  accel = gcloud.check_accelerator_type(_ACCELERATOR.value)
  runtime = _RUNTIME.value or gcloud.default_runtime_version(accel)
  env = gcloud.parse_env(_ENV.value)
  train = []
  if _ACTION.value == 'run':
    if not _CONFIG.value:
      raise LaunchError('--config is required, e.g. --config=configs/palm_8b.py')
    workdir = _WORKDIR.value or ''
    if not (workdir.startswith('/') or '://' in workdir):
      raise LaunchError(f'--workdir={workdir!r}: expected an absolute path on the workers or a '
                        'bucket URL (a relative one would live in the code directory, which is '
                        'replaced whenever code is shipped)')
    path = _CONFIG.value.split(':')[0]  # config_flags allows `file.py:argument`.
    if os.path.isabs(path):
      raise LaunchError(f'--config={_CONFIG.value}: give it relative to the code, e.g. '
                        'configs/palm_8b.py (the workers read it from their copy)')
    if not _REPO.value and not os.path.isfile(os.path.join(_SRC.value, path)):
      raise LaunchError(f'--config={_CONFIG.value}: no such file in {_SRC.value}')
    train = gcloud.train_argv(_CONFIG.value, workdir, _OVERRIDES, _EXTRA)
  if not _REPO.value and not os.path.isdir(_SRC.value):
    raise LaunchError(f'--src={_SRC.value}: not a directory')
  return Job(accel, runtime, _SPOT.value, _SRC.value, _REPO.value, _REF.value,
             gcloud.DEFAULT_EXCLUDES + tuple(_EXCLUDE.value), _PYTHON.value, _REMOTE_SETUP.value,
             env, train, _MAX_RESTARTS.value, _DELETE.value)


def main(argv) -> int:
  del argv
  try:
    if not _ZONE.value:
      raise LaunchError('--zone is required, e.g. --zone=us-central2-b')
    t = gcloud.Target(gcloud.check_name(_NAME.value), _ZONE.value, _PROJECT.value, _QUEUED.value,
                      _INTERNAL_IP.value)
    c = (DryCloud if _DRY_RUN.value else Cloud)(t, _POLL.value)
    if _DRY_RUN.value:
      say(f'dry run of --action={_ACTION.value}: printing the commands instead of running them, '
          'as for a TPU VM that does not exist yet and a run that is not preempted')
    action = _ACTION.value
    if action == 'down':
      return down(c)
    if action == 'logs':
      stream = c.popen(gcloud.ssh(t, gcloud.tail_command(), worker=_WORKER.value))
      return stream.wait() if stream else 0
    if action == 'status':
      state = c.state()
      print(f'{t.name}: {state or "NOT_FOUND"}', flush=True)
      if state == t.ready_state:
        s = c.status()
        print(f'training: {s.kind}' + (f' {s.code}' if s.code is not None else '')
              + (' (interrupted)' if s.interrupted else ''), flush=True)
      return 0
    if action == 'stop':
      c.ssh(gcloud.stop_command())
      return 0
    job = _job()
    if action in ('up', 'setup'):
      up(c, job)
      if action == 'setup':
        setup(c, job)
      return 0
    return run(c, job)
  except KeyboardInterrupt:  # Not the boundary's bare 'interrupted': say what keeps running.
    print('\ninterrupted: training (if started) keeps running on the TPU VM. Follow it with '
          '--action=logs, stop it with --action=stop, delete the VM with --action=down.',
          file=sys.stderr)
    return 130


_OVERRIDES: list[str] = []  # --config.a.b=v, passed through to launch.main.
_EXTRA: list[str] = []      # Everything after `--`, passed through to launch.main.


def parse_flags(argv: list[str]) -> list[str]:
  """Takes out --config.* overrides and `-- ...` for the training command, then parses the rest;
  a bad flag gets one line, not a traceback."""
  ours = argv[:1]
  rest = iter(argv[1:])
  for arg in rest:
    if arg == '--':
      _EXTRA.extend(rest)
    elif arg.startswith('--config.'):
      _OVERRIDES.append(arg if '=' in arg else f'{arg}={next(rest, "")}')
    else:
      ours.append(arg)
  try:
    return flags.FLAGS(ours)
  except flags.Error as e:
    print(f'error: {e} (--helpfull lists the flags)', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from launch import errors   # LaunchError and the rest: one line, exit 2.
  errors.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
