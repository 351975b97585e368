"""PEFT methods by name, and the one way to build a Decoder with one applied.

`config.peft` (configs/base.py) becomes a `PeftConfig`. `build_model` / `abstract_model` make the
Decoder, quantize its frozen base weights when `quant` is set (QLoRA: model/quant.py) and then
apply `method`, a name in `METHODS`:

  lora     low-rank updates on the linear weights `lora_targets` picks (model/peft/lora.py)
  adapter  Houlsby bottleneck adapters after `adapter_targets` (model/peft/adapter.py)
  prompt   `prompt_tokens` trainable virtual tokens before every sequence (model/peft/prompt.py)

Each method says which parameters train (a regex over parameter paths for train/trainable.py)
and whether it merges into plain weights. Every call site that turns a config into a model
(train/state.py, train/scoring.py) goes through here, so a PEFT workdir trains, resumes,
evaluates and serves with the same graph.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from model.peft import adapter as adapter_lib
from model.peft import lora as lora_lib
from model.peft import prompt as prompt_lib

QUANT_KINDS = ('', 'int8', 'int4', 'nf4')
BASE_DTYPES = ('', 'bfloat16')   # '' = the dtype the base was trained in.


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """`config.peft`; field meanings in configs/base.py. method '' = no PEFT (full fine-tuning)."""
  method: str = ''
  quant: str = ''
  base_dtype: str = ''
  quant_group_size: int = 64
  quant_targets: str = r'(attn|mlp)/w_\w+'
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = r'attn/w_(q|v)'
  rslora: bool = False
  adapter_dim: int = 16
  adapter_targets: str = r'attn/w_o|mlp/w_down'
  prompt_tokens: int = 16

  @classmethod
  def from_config(cls, section: Any) -> 'PeftConfig':
    """From a `config.peft` ConfigDict / dict (missing fields keep their defaults), or None."""
    if section is None:
      return cls()
    d = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def lora(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(rank=self.lora_rank, alpha=float(self.lora_alpha),
                               dropout=float(self.lora_dropout), targets=self.lora_targets,
                               rslora=self.rslora)

  @property
  def active(self) -> bool:
    return bool(self.method or self.quant)

  def validate(self) -> None:
    """One-line ValueError naming the `config.peft` field."""
    if self.method not in ('',) + tuple(METHODS):
      raise ValueError(f'config.peft.method={self.method!r}: expected one of '
                       f"{['', *METHODS]} ('' = full fine-tuning)")
    if self.quant not in QUANT_KINDS:
      raise ValueError(f'config.peft.quant={self.quant!r}: expected one of {list(QUANT_KINDS)}')
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f'config.peft.base_dtype={self.base_dtype!r}: expected one of '
                       f"{list(BASE_DTYPES)} ('' = as trained)")
    if self.base_dtype and not self.method:
      raise ValueError(f'config.peft.base_dtype={self.base_dtype!r} stores the frozen base: it '
                       'needs a config.peft.method')
    if self.quant and not self.method:
      raise ValueError(f'config.peft.quant={self.quant!r} freezes the base: it needs a '
                       "config.peft.method that trains something ('lora', 'adapter', 'prompt')")
    if self.method:
      METHODS[self.method].check(self)


@dataclasses.dataclass(frozen=True)
class Method:
  """apply(model, cfg, seed) -> changed paths, in place; `trainable` is the regex over parameter
  paths that trains; `merge(model)` folds the method into plain weights (None: it cannot)."""
  apply: Callable[[Any, PeftConfig, int], list[str]]
  trainable: str
  check: Callable[[PeftConfig], None]
  merge: Callable[[Any], list[str]] | None = None


def _check_lora(p: PeftConfig) -> None:
  try:
    p.lora().validate()
  except ValueError as e:   # Name the config field, not the dataclass.
    msg = str(e).replace('LoraConfig.targets', 'config.peft.lora_targets')
    for f in ('rank', 'alpha', 'dropout', 'rslora'):
      msg = msg.replace(f'LoraConfig.{f}', f'config.peft.{"" if f == "rslora" else "lora_"}{f}')
    raise ValueError(msg) from None


METHODS: dict[str, Method] = {
    'lora': Method(lambda m, p, s: lora_lib.apply_lora(m, p.lora(), seed=s),
                   trainable=r'/lora_(a|b)$', check=_check_lora, merge=lora_lib.merge_lora),
    'adapter': Method(lambda m, p, s: adapter_lib.apply_adapters(m, p.adapter_dim,
                                                                 p.adapter_targets, seed=s),
                      trainable=r'/adapter_(down|up)$', check=adapter_lib.check),
    'prompt': Method(lambda m, p, s: prompt_lib.apply_prompt(m, p.prompt_tokens, seed=s),
                     trainable=r'/soft_prompt$', check=prompt_lib.check),
}


def apply_peft(model, p: PeftConfig, seed: int = 0) -> list[str]:
  """Quantizes the base (if `quant`), then applies `method`, in place; returns changed paths."""
  p.validate()
  changed = []
  if p.quant:
    from model import quant
    changed += quant.quantize_model(model, quant.QuantConfig(p.quant, p.quant_group_size),
                                    p.quant_targets)
  if p.method:
    changed += METHODS[p.method].apply(model, p, seed)
  if p.base_dtype:
    changed += _cast_frozen(model, jnp.dtype(p.base_dtype))
  return changed


# What PEFT methods add (and train): kept in their own dtype when the base is cast.
_METHOD_PARAMS = (lora_lib.LoraParam, adapter_lib.AdapterParam, prompt_lib.PromptParam)


def _cast_frozen(model, dtype) -> list[str]:
  """Stores every base parameter (not the method's, not quantized codes) in `dtype`: the
  frozen base in bfloat16 halves its bytes; it is cast to the compute dtype when used anyway."""
  cast = []
  for path, var in nnx.iter_graph(model):
    if (isinstance(var, nnx.Param) and not isinstance(var, _METHOD_PARAMS)
        and jnp.issubdtype(var.dtype, jnp.floating) and var.dtype != dtype):
      var.value = var.value.astype(dtype)
      cast.append('/'.join(map(str, path)))
  return cast


def build_model(model_cfg, p: PeftConfig | None = None, seed: int = 0):
  """A Decoder with `p` applied (eager; inside jit or eval_shape it traces)."""
  from model import transformer
  model = transformer.Decoder(model_cfg, nnx.Rngs(params=seed))
  if p is not None and p.active:
    apply_peft(model, p, seed)
  return model


def abstract_model(model_cfg, p: PeftConfig | None = None):
  """`build_model`'s structure with ShapeDtypeStructs: no memory, any size."""
  return nnx.eval_shape(lambda: build_model(model_cfg, p))


def trainable_pattern(p: PeftConfig | None, pattern: str = '') -> str:
  """`config.train.trainable` when set, else what the PEFT method trains ('' = everything)."""
  if pattern or p is None or not p.method:
    return pattern
  # Scalar heads (model/heads.py: a LoRA reward model) are new weights: they train too.
  return f'{METHODS[p.method].trainable}|^[a-z]+_head$'


def merge_peft(model, p: PeftConfig) -> list[str]:
  """Folds the method into plain weights and dequantizes the base, in place: the model then has
  the base architecture's parameter tree (export, conversion). ValueError for a method that
  cannot merge (adapters add layers; soft prompts add inputs). A base stored in bfloat16
  (`base_dtype`) comes back as float32 weights."""
  merged = []
  if p.base_dtype:   # Merge in float32: W + scale·A·B rounded to bfloat16 would lose the update.
    _cast_frozen(model, jnp.dtype(jnp.float32))
  if p.method:
    merge = METHODS[p.method].merge
    if merge is None:
      raise ValueError(f'config.peft.method={p.method!r} cannot be merged into the base weights '
                       "(only 'lora' can); serve the workdir as it is")
    merged += merge(model)
  if p.quant:
    from model import quant
    merged += quant.dequantize_model(model)
  return merged


def prefix_ids(p: PeftConfig | None, vocab_size: int) -> list[int]:
  """Token ids every sequence must start with (the soft prompt's virtual tokens), or []."""
  if p is None or p.method != 'prompt':
    return []
  return prompt_lib.virtual_ids(vocab_size, p.prompt_tokens)
