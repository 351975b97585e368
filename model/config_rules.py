"""Config validation shared by every config section: the error class, rules (a type plus a range
or a choice list) that name the field, the value and what is allowed in one line, and the
closest-key hint for a misspelled key. model/config.py and train/config_schema.py use them.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
  """A config value is missing, unknown or inconsistent; the message names the field."""


def field(obj: Any, name: str, default: Any = None) -> Any:
  """`obj.name` from a ConfigDict, dict or any attribute holder; `default` when `obj` is None or
  has no such field."""
  if obj is None:
    return default
  if isinstance(obj, dict):
    return obj.get(name, default)
  try:
    return getattr(obj, name)
  except (AttributeError, KeyError):
    return default


def closest_key(name: str, known: Iterable[str]) -> str | None:
  """The key in `known` that `name` most likely misspells (difflib, case-insensitive), or None."""
  by_lower = {str(k).lower(): str(k) for k in known}
  hit = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
  return by_lower[hit[0]] if hit else None


def unknown_keys_hint(unknown: Iterable[str], known: Iterable[str]) -> str:
  """" (did you mean ...?)" for the unknown keys that have a close known one ('' if none do)."""
  unknown, known = list(unknown), list(known)
  pairs = [(k, c) for k in unknown if (c := closest_key(k, known))]
  if not pairs:
    return ''
  if len(unknown) == 1:
    return f' (did you mean {pairs[0][1]!r}?)'
  return ' (did you mean ' + ', '.join(f'{c!r} for {k!r}' for k, c in pairs) + '?)'


def validated_from_dict(cls, d: Mapping[str, Any], where: str):
  """Builds config dataclass `cls` from a mapping, naming unknown keys, then validates it."""
  d = dict(d)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f'{where} has unknown key(s) {unknown}{unknown_keys_hint(unknown, known)}; '
                      f'known keys: {sorted(known)}')
  cfg = cls(**d)
  cfg.validate()
  return cfg


def _num(x: float) -> str:
  return f'{x:g}' if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field accepts: a type, then a range or a list of choices.

  kind: 'bool'; 'int'; 'number' (int or float: bools are neither); 'str' (lo=1: non-empty);
  'strs' (a string or a list of strings); 'section' (a mapping); 'pairs' (a list of
  (name, value) pairs, e.g. config.mesh.rules). `lo`/`hi` bound ints and numbers (`lo_open` /
  `hi_open` exclude the bound); `also` lists values allowed outside the range (mesh sizes: -1 =
  fill); `none_ok` allows None; `note` says what special values mean ('0 = off').
  """
  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  also: tuple = ()
  none_ok: bool = False
  note: str = ''

  def allowed(self) -> str:
    """What the field accepts, in words: 'a number > 0', "one of ('stop', 'skip')", ..."""
    if self.choices:
      text = f'one of {self.choices}'
    elif self.kind == 'bool':
      text = 'a bool (True or False)'
    elif self.kind in ('int', 'number'):
      noun = 'an int' if self.kind == 'int' else 'a number'
      if self.kind == 'int' and self.lo == 1 and not self.lo_open and self.hi is None:
        text = 'a positive int'
      elif self.lo is not None and self.hi is not None:
        text = (f'{noun} in {"(" if self.lo_open else "["}{_num(self.lo)}, '
                f'{_num(self.hi)}{")" if self.hi_open else "]"}')
      elif self.lo is not None:
        text = f'{noun} {">" if self.lo_open else ">="} {_num(self.lo)}'
      elif self.hi is not None:
        text = f'{noun} {"<" if self.hi_open else "<="} {_num(self.hi)}'
      else:
        text = noun
      if self.also:
        text = ' or '.join(map(_num, self.also)) + ' or ' + text
    elif self.kind == 'str':
      text = 'a non-empty string' if self.lo else 'a string'
    elif self.kind == 'strs':
      text = 'a string or a list of strings'
    elif self.kind == 'section':
      text = 'a mapping (a config section)'
    elif self.kind == 'pairs':
      text = 'a list of (name, value) pairs'
    else:
      raise ValueError(f'Rule.kind={self.kind!r} is not a known kind')
    if self.none_ok:
      text += ' or None'
    return text + (f' ({self.note})' if self.note else '')

  def check(self, path: str, v: Any) -> None:
    """Raises ConfigError naming `path`, the value and what is allowed unless `v` fits."""
    if v is None and self.none_ok:
      return
    if not self._type_ok(v):
      raise ConfigError(f'{path} must be {self.allowed()}, got {v!r} ({type(v).__name__})')
    if not self._value_ok(v):
      raise ConfigError(f'{path} must be {self.allowed()}, got {v!r}')

  def _type_ok(self, v: Any) -> bool:
    if self.choices:
      return True   # Judged by membership: a wrong type is just not one of the choices.
    if self.kind == 'bool':
      return isinstance(v, bool)
    if self.kind == 'int':
      return isinstance(v, int) and not isinstance(v, bool)
    if self.kind == 'number':
      return isinstance(v, (int, float)) and not isinstance(v, bool)
    if self.kind == 'str':
      return isinstance(v, str)
    if self.kind == 'strs':
      return isinstance(v, str) or (isinstance(v, (list, tuple))
                                    and all(isinstance(x, str) for x in v))
    if self.kind == 'section':   # A dict, a ConfigDict (not a Mapping) or a config dataclass.
      return isinstance(v, Mapping) or dataclasses.is_dataclass(v) or hasattr(v, 'keys')
    if self.kind == 'pairs':
      return isinstance(v, (list, tuple)) and all(
          isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) for x in v)
    return False

  def _value_ok(self, v: Any) -> bool:
    if self.choices:
      return any(v == c and type(v) is type(c) for c in self.choices)
    if v in self.also and not isinstance(v, bool):
      return True
    if self.kind == 'number' and not math.isfinite(v):
      return False
    if self.kind in ('int', 'number'):
      if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
        return False
      if self.hi is not None and not (v < self.hi if self.hi_open else v <= self.hi):
        return False
    if self.kind == 'str' and self.lo and len(v) < self.lo:
      return False
    return True


# Shorthands for the rule tables here and in train/config_schema.py.
def positive_int(note: str = '') -> Rule:
  return Rule('int', lo=1, note=note)


def nonneg_int(note: str = '') -> Rule:
  return Rule('int', lo=0, note=note)


def number(gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, note: str = '') -> Rule:
  return Rule('number', lo=ge if gt is None else gt, hi=le if lt is None else lt,
              lo_open=gt is not None, hi_open=lt is not None, note=note)


def choice(options, note: str = '') -> Rule:
  return Rule('str', choices=tuple(options), note=note)


BOOL = Rule('bool')


def check_fields(obj: Any, rules: Mapping[str, Rule], where: str) -> None:
  """Checks each field of dataclass `obj` against its rule, in the table's order."""
  for name, rule in rules.items():
    rule.check(f'{where}.{name}', getattr(obj, name))
