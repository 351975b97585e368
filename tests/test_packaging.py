"""The README's install instructions name extras that setup.py really defines."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extras() -> set[str]:
  text = open(os.path.join(ROOT, 'setup.py')).read()
  block = text[text.index('extras_require'):]
  return set(re.findall(r"^\s*'([a-z_]+)': \[", block, re.M))


def test_every_extra_the_readme_installs_exists():
  # Issue 10, failure 6: the README said `tensorboard --logdir` but no extra installed it.
  readme = open(os.path.join(ROOT, 'README.md')).read()
  named = set(re.findall(r"\.\[([a-z_,]+)\]", readme))
  named = {e for group in named for e in group.split(',')}
  assert named and named <= _extras(), named - _extras()
  assert "'.[tensorboard]'" in readme and 'tensorboard --logdir' in readme

