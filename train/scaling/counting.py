"""Parameter and FLOP counts for scaling laws, for any `ModelConfig`.

Conventions (each is a choice the papers make differently, so all are exposed):
- total:          every parameter (PaLM Table 1 sizes; what Chinchilla's N means).
- embedding:      the token tables (one when tied, input + output when untied).
- non_embedding:  total minus embedding tables (Kaplan et al. 2020 count N this way).
- active:         parameters used per token; for sparse MoE only the top-k + shared experts
                  (`ModelConfig.active_param_count()`); equals total for a dense model.

FLOPs per training token (forward + backward):
- `training_flops_per_token`: PaLM (Chowdhery et al. 2022, App. B) 6·N + 12·L·H·Q·T, with N the
  active matmul parameters (an untied input table is a lookup, not a matmul) and the attention
  term at full length T (no causal halving). Training FLOPs C = flops_per_token · D.
- `deepseek_flops_per_token`: DeepSeek LLM (2024, §3.1) M = 72·L·d² + 12·L·d·T, non-embedding
  FLOPs per token including attention; equals 6·(12·L·d²) + attention for a plain 4d MLP with
  heads·head_dim = d.
- `kaplan_non_embedding_params`: Kaplan et al. 2020's approximation N ≈ 12·L·d².
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  embedding: int
  non_embedding: int
  active: int                 # Per token (MoE: routed top-k + shared experts + router).
  active_non_embedding: int

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def as_model_config(model: Any) -> ModelConfig:
  """A validated ModelConfig from a ModelConfig, a mapping or a ConfigDict (`cfg.model`)."""
  if isinstance(model, ModelConfig):
    return model
  if hasattr(model, 'to_dict'):
    model = model.to_dict()
  if not isinstance(model, Mapping):
    raise TypeError(f'expected a ModelConfig, a mapping or cfg.model, got {type(model).__name__}')
  return ModelConfig.from_dict(model)


def param_counts(model: Any) -> ParamCounts:
  cfg = as_model_config(model)
  total = int(cfg.param_count())
  embedding = int(cfg.embedding_param_count())
  active = int(cfg.active_param_count())
  return ParamCounts(total=total, embedding=embedding, non_embedding=total - embedding,
                     active=active, active_non_embedding=active - embedding)


def attention_flops_per_token(model: Any, seq_len: int) -> float:
  """PaLM App. B attention term 12·L·H·Q·T: QKᵀ and AV, forward and backward, full length T."""
  cfg = as_model_config(model)
  _check_seq_len(seq_len)
  return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def training_flops_per_token(model: Any, seq_len: int) -> float:
  """PaLM App. B: 6·N_active + 12·L·H·Q·T (see the module docstring): the one formula,
  `ModelConfig.flops_per_token`, for a ModelConfig, a mapping or `cfg.model`. For MoE the experts
  a token does not visit cost no FLOPs, so only the active parameters count.
  """
  cfg = as_model_config(model)
  _check_seq_len(seq_len)
  return cfg.flops_per_token(seq_len)


def deepseek_flops_per_token(model: Any, seq_len: int) -> float:
  """DeepSeek LLM (2024) M = 72·n_layer·d_model² + 12·n_layer·d_model·l_seq (shape only)."""
  cfg = as_model_config(model)
  _check_seq_len(seq_len)
  layers, d = cfg.num_layers, cfg.d_model
  return 72.0 * layers * d * d + 12.0 * layers * d * seq_len


def kaplan_non_embedding_params(model: Any) -> int:
  """Kaplan et al. 2020, §2.1: N ≈ 2·d_model·n_layer·(2·d_attn + d_ff) = 12·n_layer·d_model²."""
  cfg = as_model_config(model)
  return 12 * cfg.num_layers * cfg.d_model * cfg.d_model


def training_flops(model: Any, seq_len: int, tokens: float) -> float:
  """C = flops_per_token · D for a run of `tokens` training tokens of length `seq_len`."""
  if tokens < 0:
    raise ValueError(f'tokens must be >= 0, got {tokens}')
  return training_flops_per_token(model, seq_len) * tokens


def chinchilla_flops(params: float, tokens: float) -> float:
  """C ≈ 6·N·D (Hoffmann et al. 2022, §2; Kaplan et al. 2020, §2.1)."""
  return 6.0 * params * tokens


def _check_seq_len(seq_len: int) -> None:
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
    raise ValueError(f'seq_len must be a positive int, got {seq_len!r}')
