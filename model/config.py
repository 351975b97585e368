"""Architecture config: one frozen dataclass, validated, with parameter and FLOP counts.

Every architectural choice is a value here, so a model family is a config, never an
`if family == ...` branch in model code. Built from `cfg.model` (a ConfigDict) by
`ModelConfig.from_dict`, which rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ('swiglu', 'geglu', 'gelu')
BLOCKS = ('serial', 'parallel')
REMAT_POLICIES = ('none', 'full', 'dots')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config value is missing, unknown or inconsistent; the message names the field."""


def validated_from_dict(cls, d: Mapping[str, Any], where: str):
  """Builds config dataclass `cls` from a mapping, naming unknown keys, then validates it."""
  d = dict(d)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f'{where} has unknown key(s) {unknown}; known keys: {sorted(known)}')
  cfg = cls(**d)
  cfg.validate()
  return cfg


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and flavour of the decoder. Field names are the `cfg.model.*` keys."""
  vocab_size: int = 8192
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1          # 1 = multi-query, == num_heads = multi-head, between = GQA.
  head_dim: int = 64
  mlp_dim: int = 1024            # Per branch for gated activations.
  activation: str = 'swiglu'     # swiglu | geglu (gated, 3 matrices) | gelu (plain, 2).
  block: str = 'serial'          # serial pre-norm | parallel (PaLM: x + attn(n(x)) + mlp(n(x))).
  rope_base: float = 10_000.0
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # Multiply input embeddings by sqrt(d_model) (Gemma).
  logit_softcap: float = 0.0     # 0 = off; else logits = cap * tanh(logits / cap) (Gemma 2).
  norm_eps: float = 1e-6
  norm_offset_one: bool = False  # RMSNorm gain is (1 + scale), scale zero-initialised (Gemma).
  post_norms: bool = False       # Also normalise attention/MLP outputs before the residual (Gemma 2/3).
  qk_norm: bool = False          # RMSNorm on queries and keys per head (Gemma 3).
  attn_softcap: float = 0.0      # 0 = off; else attention logits = cap * tanh(logits / cap) (Gemma 2).
  query_scale_dim: int = 0       # Queries scaled by query_scale_dim^-0.5; 0 = head_dim (Gemma 2 27B: 144).
  # Layer i is local (sliding window) or global by layer_pattern[i % len]: 'G' all global,
  # 'LG' alternating (Gemma 2), 'LLLLLG' 5:1 (Gemma 3).
  layer_pattern: str = 'G'
  sliding_window: int = 0        # Keys within this many positions (incl. self) on local layers.
  rope_base_local: float = 0.0   # RoPE base on local layers; 0 = rope_base (Gemma 3: 10k local, 1M global).
  # Context extension on global layers (local layers keep the plain base): none | linear
  # (positions / factor, Gemma 3 4B+) | llama3 (frequency-dependent, Llama 3.1).
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_seq_len: int = 2048        # Longest context the model is used with (KV cache size cap).
  remat: str = 'none'            # none | full | dots (save matmul outputs only).
  dtype: str = 'float32'         # Compute dtype; parameters stay float32.
  param_dtype: str = 'float32'

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    return validated_from_dict(cls, d, 'config.model')

  def validate(self) -> None:
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'mlp_dim', 'max_seq_len'):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f'config.model.{name} must be a positive int, got {v!r}')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f'config.model.num_heads={self.num_heads} must be divisible by '
          f'config.model.num_kv_heads={self.num_kv_heads} (each KV head serves a group of query heads)')
    if self.head_dim % 2:
      raise ConfigError(f'config.model.head_dim={self.head_dim} must be even for RoPE')
    for name, allowed in (('activation', ACTIVATIONS), ('block', BLOCKS),
                          ('remat', REMAT_POLICIES), ('dtype', DTYPES), ('param_dtype', DTYPES)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f'config.model.{name}={getattr(self, name)!r}; expected one of {allowed}')
    if not self.layer_pattern or set(self.layer_pattern) - set('LG'):
      raise ConfigError(f'config.model.layer_pattern={self.layer_pattern!r}; expected a non-empty '
                        "string of 'L' (local) and 'G' (global), e.g. 'LG'")
    if 'L' in self.layer_pattern and self.sliding_window <= 0:
      raise ConfigError(f'config.model.layer_pattern={self.layer_pattern!r} has local layers, so '
                        f'config.model.sliding_window must be > 0 (got {self.sliding_window})')
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ConfigError(f'config.model.rope_scaling={self.rope_scaling!r}; expected one of {ROPE_SCALINGS}')
    for name in ('attn_softcap', 'query_scale_dim', 'sliding_window', 'rope_base_local'):
      if getattr(self, name) < 0:
        raise ConfigError(f'config.model.{name}={getattr(self, name)} must be >= 0 (0 = off/default)')
    if self.rope_base <= 1:
      raise ConfigError(f'config.model.rope_base={self.rope_base} must be > 1')
    if self.logit_softcap < 0:
      raise ConfigError(f'config.model.logit_softcap={self.logit_softcap} must be >= 0 (0 = off)')

  @property
  def gated(self) -> bool:
    return self.activation in ('swiglu', 'geglu')

  def layer_kinds(self) -> str:
    """'L'/'G' for each layer, the pattern repeated over the depth."""
    p = self.layer_pattern
    return ''.join(p[i % len(p)] for i in range(self.num_layers))

  # ---- Counting (closed form; tests check it against the built model) -------------------------

  def layer_param_count(self) -> int:
    d, h = self.d_model, self.head_dim
    attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2   # q, o; k, v
    mlp = d * self.mlp_dim * (3 if self.gated else 2)
    norms = d * ((1 if self.block == 'parallel' else 2) + (2 if self.post_norms else 0))
    norms += 2 * h if self.qk_norm else 0
    return attn + mlp + norms

  def embedding_param_count(self) -> int:
    return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

  def param_count(self) -> int:
    """All parameters: embeddings, layers and the final norm."""
    return self.embedding_param_count() + self.num_layers * self.layer_param_count() + self.d_model

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token, PaLM (Chowdhery et al. 2022, App. B): 6N + 12·L·H·Q·T.

    N is every parameter, as in PaLM, except an untied input table: a lookup costs no FLOPs.
    Attention is counted at full length T without causal halving, as in the paper.
    """
    n = self.param_count() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)
    return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len
