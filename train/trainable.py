"""Which parameters a run trains: `config.train.trainable`, a regular expression over parameter
paths such as `stack0/block0/attn/w_q` ('' = all).

Frozen parameters get no gradient and no optimizer state: the step differentiates only the
trainable subtree and the optimizer is built on it, so Adam's moments exist only for what trains
(LoRA adapters, soft prompts, one layer). A frozen tree is the same nested dict with the other
leaves replaced by None (an empty pytree node), so `merge(split(p, m)) == p`.
"""
from __future__ import annotations

import re
from typing import Any

import jax


def path_name(path) -> str:
  """'stack0/block0/attn/w_q' for a pytree key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def make_mask(params: Any, pattern: str) -> Any | None:
  """A tree of bools (True = trainable) for `pattern`, or None when everything trains. A
  pattern that selects nothing is refused, naming a few paths it could have matched."""
  if not pattern:
    return None
  try:
    regex = re.compile(pattern)
  except re.error as e:
    from model.config_rules import ConfigError
    raise ConfigError(f'config.train.trainable={pattern!r} is not a regular expression ({e})') from None
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(path_name(p))), params)
  if not any(jax.tree.leaves(mask)):
    from model.config_rules import ConfigError
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]][:6]
    raise ConfigError(f'config.train.trainable={pattern!r} matches no parameter; paths look like '
                      f'{", ".join(names)}, ...')
  return mask


def split(params: Any, mask: Any | None) -> tuple[Any, Any]:
  """(trainable, frozen): each the params' structure with the other side's leaves None. Without
  a mask everything is trainable and the frozen tree is None."""
  if mask is None:
    return params, None
  return (jax.tree.map(lambda p, m: p if m else None, params, mask),
          jax.tree.map(lambda p, m: None if m else p, params, mask))


def merge(trainable: Any, frozen: Any | None) -> Any:
  """Inverse of `split`."""
  if frozen is None:
    return trainable
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)
