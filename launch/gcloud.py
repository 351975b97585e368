"""The commands the Cloud TPU launcher (launch/tpu.py) runs, built as argv lists by pure functions.

Nothing here runs anything: launch/tpu.py executes (or, with --dry_run, prints) what these return,
and tests compare them exactly. Remote shell commands are strings for `gcloud ... ssh --command`,
with every user-supplied value passed through shlex.quote.

gcloud syntax follows the Cloud SDK reference for `gcloud compute tpus tpu-vm {create,describe,
delete,ssh,scp}` and `gcloud compute tpus queued-resources {create,describe,delete}`.
"""
from __future__ import annotations

import dataclasses
import re
import shlex

# Where things live on every worker, relative to the login user's home directory (the directory
# `gcloud ... ssh --command` starts in).
REMOTE_DIR = 'palmax'                  # The code; replaced whenever code is shipped.
ARCHIVE = 'palmax.tar.gz'              # The packed local checkout, while it is being unpacked.
LOG = '$HOME/palmax.log'               # Training stdout+stderr, one per worker.
EXIT = '$HOME/palmax.exit'             # The training command's exit status, once it has ended.
STOP = '$HOME/palmax.stop'             # Left by --action=stop so a watching launcher won't restart.
PID = '$HOME/palmax.pid'               # The subshell that runs training and records its status.
# launch/main.py (the trainer) prints this when SIGTERM made it save and exit: a preemption.
RESUME_MARKER = 'Run the same command again to resume'

# Node states (tpu-vm describe) and queued-resource states (queued-resources describe).
NODE_READY = 'READY'
NODE_LOST = frozenset({'PREEMPTED', 'TERMINATED'})
QUEUED_READY = 'ACTIVE'
QUEUED_LOST = frozenset({'SUSPENDING', 'SUSPENDED'})
QUEUED_FAILED = frozenset({'FAILED'})

# TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes): by TPU generation.
_RUNTIMES = {'v6e': 'v2-alpha-tpuv6e', 'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite',
             'v5e': 'v2-alpha-tpuv5-lite', 'v4': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
             'v2': 'tpu-ubuntu2204-base'}
_ACCELERATOR = re.compile(r'^(v\d+[a-z]*|tpu\d+[a-z]*)-(\d+)$')   # v5p-256, v5litepod-16, v4-8
_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')           # GCP resource IDs
_ENV_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
DEFAULT_EXCLUDES = ('.git', '.venv', 'venv', 'runs', '__pycache__', '*.egg-info', '.pytest_cache')


class LaunchError(ValueError):
  """A problem the user can fix; printed as one line, without a traceback."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Which TPU VM (or queued resource of the same name, whose single node also has that name)."""
  name: str
  zone: str
  project: str | None = None
  queued: bool = False       # Made by `queued-resources create`, not `tpu-vm create`.
  internal_ip: bool = False  # Reach workers by internal IP (launching from inside the VPC).

  @property
  def ready_state(self) -> str:
    return QUEUED_READY if self.queued else NODE_READY

  @property
  def lost_states(self) -> frozenset[str]:
    return QUEUED_LOST if self.queued else NODE_LOST


def check_name(name: str | None) -> str:
  if not name or not _NAME.match(name):
    raise LaunchError(f'--name={name!r}: expected a TPU VM name of lowercase letters, digits and '
                      "hyphens starting with a letter, e.g. --name=palmax-v5p")
  return name


def check_accelerator_type(accelerator_type: str | None) -> str:
  if not accelerator_type or not _ACCELERATOR.match(accelerator_type):
    raise LaunchError(f'--accelerator_type={accelerator_type!r}: expected GENERATION-SIZE, e.g. '
                      'v4-8, v5p-256, v5litepod-16, v6e-8')
  return accelerator_type


def default_runtime_version(accelerator_type: str) -> str:
  family = check_accelerator_type(accelerator_type).split('-')[0]
  if family not in _RUNTIMES:
    raise LaunchError(f'no default TPU runtime for {accelerator_type}; pass --runtime_version '
                      '(list them with: gcloud compute tpus tpu-vm versions list --zone=ZONE)')
  return _RUNTIMES[family]


def parse_env(entries: list[str]) -> list[tuple[str, str]]:
  """`KEY=VALUE` strings to pairs, in order; the value may contain '=' and spaces."""
  pairs = []
  for entry in entries:
    key, sep, value = entry.partition('=')
    if not sep or not _ENV_KEY.match(key):
      raise LaunchError(f'bad --env entry {entry!r}: expected KEY=VALUE with KEY a shell variable '
                        'name, e.g. --env=TPU_STDERR_LOG_LEVEL=0')
    pairs.append((key, value))
  return pairs


# ---- gcloud commands -------------------------------------------------------------------------

def _gcloud(t: Target, group: str, verb: str, *positional: str) -> list[str]:
  argv = ['gcloud', 'compute', 'tpus', group, verb, *positional, f'--zone={t.zone}']
  return argv + ([f'--project={t.project}'] if t.project else [])


def describe(t: Target) -> list[str]:
  """Prints just the state (READY, PREEMPTED, ...; ACTIVE, SUSPENDED, ... for queued resources);
  exits non-zero with NOT_FOUND on stderr when there is none."""
  if t.queued:
    return _gcloud(t, 'queued-resources', 'describe', t.name) + ['--format=value(state.state)']
  return _gcloud(t, 'tpu-vm', 'describe', t.name) + ['--format=value(state)']


def create(t: Target, accelerator_type: str, runtime_version: str, spot: bool) -> list[str]:
  if t.queued:  # The queued resource and its one node share the name, so ssh/scp use it too.
    argv = _gcloud(t, 'queued-resources', 'create', t.name) + [
        f'--node-id={t.name}', f'--accelerator-type={accelerator_type}',
        f'--runtime-version={runtime_version}']
  else:
    argv = _gcloud(t, 'tpu-vm', 'create', t.name) + [
        f'--accelerator-type={accelerator_type}', f'--version={runtime_version}']
  return argv + (['--spot'] if spot else []) + (['--internal-ips'] if t.internal_ip else [])


def delete(t: Target) -> list[str]:
  """--quiet skips the confirmation prompt; --force also deletes a queued resource's node."""
  if t.queued:
    return _gcloud(t, 'queued-resources', 'delete', t.name) + ['--force', '--quiet']
  return _gcloud(t, 'tpu-vm', 'delete', t.name) + ['--quiet']


def display(argv: list[str]) -> str:
  """The command as a shell line, with a --command value quoted on its own (easier to read)."""
  return ' '.join(f'--command={shlex.quote(a[10:])}' if a.startswith('--command=')
                  else shlex.quote(a) for a in argv)


def ssh(t: Target, command: str, worker: str = 'all') -> list[str]:
  """Runs `command` with bash on one worker or, with worker='all', on every worker at once."""
  return (_gcloud(t, 'tpu-vm', 'ssh', t.name) + [f'--worker={worker}']
          + (['--internal-ip'] if t.internal_ip else []) + [f'--command={command}'])


def scp(t: Target, local: str, remote: str, worker: str = 'all') -> list[str]:
  return (_gcloud(t, 'tpu-vm', 'scp', local, f'{t.name}:{remote}') + [f'--worker={worker}']
          + (['--internal-ip'] if t.internal_ip else []))


def pack(src: str, archive: str, excludes: tuple[str, ...] = DEFAULT_EXCLUDES) -> list[str]:
  """A local tarball of the checkout without virtualenvs, run outputs and git history."""
  return ['tar', '-czf', archive, *(f'--exclude={e}' for e in excludes), '-C', src, '.']


# ---- remote shell commands (run on the workers through ssh) ----------------------------------

def unpack_command() -> str:
  return (f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} '
          f'&& rm -f {ARCHIVE}')


def clone_command(repo: str, ref: str | None = None) -> str:
  cmd = f'rm -rf {REMOTE_DIR} && git clone -q {shlex.quote(repo)} {REMOTE_DIR}'
  return cmd + (f' && cd {REMOTE_DIR} && git checkout -q {shlex.quote(ref)}' if ref else '')


def install_command(python: str) -> str:
  """A fresh virtualenv with palmax and its `tpu` extra (jax[tpu]). uv supplies the Python
  version palmax needs (>= 3.11) whatever the TPU image ships (Ubuntu 22.04: 3.10)."""
  return (f'cd {REMOTE_DIR} && export PATH="$HOME/.local/bin:$PATH" && '
          '(command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) && '
          f'uv venv -q --seed --python {shlex.quote(python)} .venv && '
          '.venv/bin/pip install -q -e ".[tpu]"')


def train_argv(config: str, workdir: str, overrides: list[str], extra: list[str]) -> list[str]:
  """The training command every worker runs. --distributed=auto: jax.distributed.initialize()
  finds the coordinator, process count and index from the TPU VM's metadata."""
  return ['.venv/bin/python', '-m', 'launch.main', f'--config={config}', f'--workdir={workdir}',
          '--distributed=auto', *overrides, *extra]


def start_command(env: list[tuple[str, str]], argv: list[str]) -> str:
  """Starts training in the background, logging to LOG, and returns at once. A subshell runs it
  and records its exit status in EXIT; `trap "" HUP` is nohup for that subshell (nohup takes a
  single command), so training outlives the ssh session. The variables are set for the training
  process only. PID is the subshell's, so probe and stop find exactly this run."""
  job = ' '.join([*(f'{k}={shlex.quote(v)}' for k, v in env), *map(shlex.quote, argv)])
  return (f'cd {REMOTE_DIR} || exit 1; rm -f {EXIT} {STOP}; '
          f'(trap "" HUP; {job}; echo $? > {EXIT}.tmp; mv {EXIT}.tmp {EXIT}) '
          f'> {LOG} 2>&1 < /dev/null & echo $! > {PID}')


def probe_command() -> str:
  """Prints one of: exit N (then `interrupted` if the trainer saved and exited on SIGTERM) /
  stopped (exited after --action=stop) / running / none (nothing started, or the process vanished
  without an exit status). EXIT is looked at first: it is the subshell's last act."""
  return (f'if [ -f {EXIT} ]; then if [ -f {STOP} ]; then echo stopped; else '
          f'echo exit $(cat {EXIT}); grep -q "{RESUME_MARKER}" {LOG} && echo interrupted; fi; '
          f'elif [ -f {PID} ] && kill -0 $(cat {PID}) 2> /dev/null; then echo running; '
          'else echo none; fi; true')


@dataclasses.dataclass
class Status:
  """What probe_command printed on worker 0."""
  kind: str                  # running | stopped | exit | none | unreachable (ssh failed)
  code: int | None = None    # The exit status, for kind == 'exit'.
  interrupted: bool = False  # The trainer saved a checkpoint and exited on SIGTERM.

  @classmethod
  def parse(cls, out: str) -> 'Status':
    words = out.split()
    if words[:1] == ['exit'] and len(words) > 1 and words[1].lstrip('-').isdigit():
      return cls('exit', int(words[1]), 'interrupted' in words)
    return cls(words[0] if words and words[0] in ('running', 'stopped', 'none') else 'unreachable')


def tail_command(from_start: bool = True) -> str:
  """Follows LOG (-F: also across the truncation when training restarts)."""
  return f'tail -n {"+1" if from_start else "0"} -F {LOG}'


def stop_command() -> str:
  """SIGTERM to the trainer (the subshell's child): it saves a checkpoint and exits; the STOP
  marker keeps a watching launcher from treating that as a preemption."""
  return f'touch {STOP}; pkill -TERM -P $(cat {PID}) 2> /dev/null; true'
