"""Architecture config: one frozen dataclass, validated, with parameter and FLOP counts.

Every architectural choice is a value here, so a model family is a config, never an
`if family == ...` branch in model code. Built from `cfg.model` (a ConfigDict) by
`ModelConfig.from_dict`, which rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from model.config_rules import (  # noqa: F401 (ConfigError: callers import it from here)
    BOOL, ConfigError, Rule, check_fields, choice, nonneg_int, number, positive_int,
    validated_from_dict)
from model.attention_ops import BACKENDS as ATTENTION_BACKENDS

ACTIVATIONS = ('swiglu', 'geglu', 'gelu')
BLOCKS = ('serial', 'parallel')
REMAT_POLICIES = ('none', 'full', 'dots')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
DTYPES = ('float32', 'bfloat16')



GATINGS = ('softmax_topk', 'topk_softmax', 'sigmoid')
DISPATCHES = ('capacity', 'dropless')
CAPACITY_GROUPS = ('batch', 'sequence')

# Every MoEConfig field's type and range (tests/train/test_config_schema.py checks the coverage).
MOE_RULES = {
    'num_experts': positive_int(), 'top_k': positive_int(), 'expert_mlp_dim': positive_int(),
    'gating': choice(GATINGS), 'renormalize': BOOL, 'routed_scaling_factor': number(gt=0),
    'num_shared_experts': nonneg_int(), 'dispatch': choice(DISPATCHES),
    'capacity_factor': number(gt=0), 'capacity_group': choice(CAPACITY_GROUPS),
    'aux_loss_coef': number(ge=0), 'router_z_loss_coef': number(ge=0),
    'bias_update_rate': number(ge=0, note='0 = off'), 'router_init_scale': number(ge=0),
    'interval': positive_int(), 'first_dense_layers': nonneg_int(),
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Sparse MoE layer. Field names are the `cfg.model.moe.*` keys."""
  num_experts: int = 8
  top_k: int = 2
  expert_mlp_dim: int = 1024      # F, per branch for gated activations.
  # softmax_topk: softmax over all E, then top-k (GShard/Switch); topk_softmax: softmax over the
  # kept k logits (Mixtral); sigmoid: DeepSeek-V3.
  gating: str = 'softmax_topk'
  renormalize: bool = False       # softmax_topk only: rescale the kept k probabilities to sum 1.
  # Multiplies the routed experts' gate weights (DeepSeek-V2/V3 "routed scaling factor", 2.5 in
  # V3): renormalised top-k weights sum to 1, so k experts of width F/k give 1/k of a dense FFN's
  # output until they grow; a factor k makes them a dense FFN of width F sliced k ways.
  routed_scaling_factor: float = 1.0
  num_shared_experts: int = 0     # Always-on experts, each of width F (DeepSeekMoE).
  dispatch: str = 'capacity'      # capacity (drop overflow) | dropless (ragged_dot, MegaBlocks).
  capacity_factor: float = 1.25   # C = ceil(S * k / E * capacity_factor), S tokens per group.
  # sequence: one group per row (the dispatch tensor stays small); batch: one group of B*T tokens.
  capacity_group: str = 'sequence'
  aux_loss_coef: float = 1e-2     # Switch alpha.
  router_z_loss_coef: float = 1e-3  # ST-MoE c_z.
  bias_update_rate: float = 0.0   # DeepSeek-V3 gamma (1e-3 in the paper); 0 = off.
  router_init_scale: float = 0.1  # Switch: router weights at 0.1x the fan-in variance.
  # Which layers are MoE: after `first_dense_layers` dense ones (DeepSeek-V3: 3), every
  # `interval`-th layer (1: all, Mixtral; 2: every other, GShard/GLaM), ending each group of
  # `interval` layers.
  interval: int = 1
  first_dense_layers: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'MoEConfig':
    return validated_from_dict(cls, d, 'config.model.moe')

  def validate(self) -> None:
    check_fields(self, MOE_RULES, 'config.model.moe')
    if self.top_k > self.num_experts:
      raise ConfigError(f'config.model.moe.top_k={self.top_k} must be <= '
                        f'config.model.moe.num_experts={self.num_experts}')

  def capacity(self, tokens_per_group: int) -> int:
    """C = ceil(S*k/E * capacity_factor), capped at S (an expert gets at most one slot per token)."""
    c = math.ceil(tokens_per_group * self.top_k / self.num_experts * self.capacity_factor)
    return max(1, min(c, tokens_per_group))

  def layer_param_counts(self, d_model: int, gated: bool) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE FFN: routed + shared experts + router.
    The router bias is a buffer, not a parameter."""
    per_expert = d_model * self.expert_mlp_dim * (3 if gated else 2)
    router = d_model * self.num_experts
    shared = self.num_shared_experts * per_expert
    return (self.num_experts * per_expert + shared + router,
            self.top_k * per_expert + shared + router)


# Fields that choose how the model is computed, not what it computes: a resume or a checkpoint
# reader may change them.
HOW_NOT_WHAT = ('attention_impl', 'scan_layers')

# Every ModelConfig field's type and range, in field order; cross-field checks are in validate().
MODEL_RULES = {
    'vocab_size': positive_int(), 'd_model': positive_int(), 'num_layers': positive_int(),
    'num_heads': positive_int(), 'num_kv_heads': positive_int(), 'head_dim': positive_int(),
    'mlp_dim': positive_int(), 'activation': choice(ACTIVATIONS), 'block': choice(BLOCKS),
    'rope_base': number(gt=1), 'tie_embeddings': BOOL, 'scale_embeddings': BOOL,
    'logit_softcap': number(ge=0, note='0 = off'), 'norm_eps': number(gt=0),
    'norm_offset_one': BOOL, 'post_norms': BOOL, 'qk_norm': BOOL,
    'attn_softcap': number(ge=0, note='0 = off'),
    'query_scale_dim': nonneg_int('0 = head_dim'),
    'layer_pattern': Rule('str', lo=1, note="'L' local and 'G' global layers, e.g. 'LG'"),
    'sliding_window': nonneg_int('0 = no local layers'),
    'rope_base_local': Rule('number', lo=1, lo_open=True, also=(0,), note='0 = rope_base'),
    'rope_scaling': choice(ROPE_SCALINGS), 'rope_scaling_factor': number(gt=0),
    'rope_low_freq_factor': number(gt=0), 'rope_high_freq_factor': number(gt=0),
    'rope_original_max_len': positive_int(), 'max_seq_len': positive_int(),
    'remat': choice(REMAT_POLICIES), 'scan_layers': BOOL,
    'attention_impl': choice(ATTENTION_BACKENDS),
    'dtype': choice(DTYPES), 'param_dtype': choice(DTYPES),
    # A mapping of MoEConfig fields (MOE_RULES) turned into a MoEConfig by from_dict; None = dense.
    'moe': Rule('section', none_ok=True, note='MoE settings; None = all dense'),
    'heads': Rule('strs', note="scalar heads on the last hidden state, e.g. ('reward',)"),
}


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
  scan_layers: bool = True       # False: unroll the layer scan (compile time grows with depth).
  # Attention backend (model/attention_ops): xla (reference) | flash (blockwise, pure JAX) |
  # cudnn (GPU only). Changes how attention is computed, never what.
  attention_impl: str = 'xla'
  dtype: str = 'float32'         # Compute dtype; parameters stay float32.
  param_dtype: str = 'float32'
  moe: MoEConfig | None = None   # Sparse MoE FFN on the layers it selects; None = all dense.
  heads: tuple[str, ...] = ()    # Scalar heads (model/heads.py): 'reward' (reward model), 'value' (PPO).

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    d = dict(d)
    if isinstance(d.get('moe'), Mapping):
      d['moe'] = MoEConfig.from_dict(d['moe'])
    if isinstance(d.get('heads'), (list, tuple, str)):
      d['heads'] = (d['heads'],) if isinstance(d['heads'], str) else tuple(d['heads'])
    return validated_from_dict(cls, d, 'config.model')

  def to_dict(self) -> dict[str, Any]:
    """Plain nested dict (JSON-able; `from_dict` inverts it). A model without scalar heads has
    no 'heads' key, so records written before heads existed still compare equal."""
    d = dataclasses.asdict(self)
    if not d['heads']:
      del d['heads']
    else:
      d['heads'] = list(d['heads'])
    return d

  def validate(self) -> None:
    check_fields(self, {k: r for k, r in MODEL_RULES.items() if k != 'moe'}, 'config.model')
    from model.heads import HEADS
    if (not isinstance(self.heads, tuple) or len(set(self.heads)) != len(self.heads)
        or set(self.heads) - set(HEADS)):
      raise ConfigError(f'config.model.heads={self.heads!r}: expected a tuple of distinct names '
                        f'from {HEADS}')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f'config.model.num_heads={self.num_heads} must be divisible by '
          f'config.model.num_kv_heads={self.num_kv_heads} (each KV head serves a group of query heads)')
    if self.head_dim % 2:
      raise ConfigError(f'config.model.head_dim={self.head_dim} must be even for RoPE')
    if set(self.layer_pattern) - set('LG'):
      raise ConfigError(f'config.model.layer_pattern={self.layer_pattern!r}; expected a non-empty '
                        "string of 'L' (local) and 'G' (global), e.g. 'LG'")
    if 'L' in self.layer_pattern and self.sliding_window <= 0:
      raise ConfigError(f'config.model.layer_pattern={self.layer_pattern!r} has local layers, so '
                        f'config.model.sliding_window must be > 0 (got {self.sliding_window})')
    # Llama 3.1 interpolates between the two wavelength cut-offs: dividing by (high - low).
    if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ConfigError(
          f'config.model.rope_high_freq_factor={self.rope_high_freq_factor} must be > '
          f'config.model.rope_low_freq_factor={self.rope_low_freq_factor} for '
          "config.model.rope_scaling='llama3'")
    if self.moe is not None:
      if not isinstance(self.moe, MoEConfig):
        raise ConfigError(f'config.model.moe must be a mapping of MoE settings or None, got {self.moe!r}')
      self.moe.validate()
      m = self.moe
      if m.first_dense_layers > self.num_layers or (self.num_layers - m.first_dense_layers) % m.interval:
        raise ConfigError(
            f'config.model.num_layers={self.num_layers} minus config.model.moe.first_dense_layers='
            f'{m.first_dense_layers} must be divisible by config.model.moe.interval={m.interval}')

  @property
  def gated(self) -> bool:
    return self.activation in ('swiglu', 'geglu')

  def layer_kinds(self) -> str:
    """'L'/'G' for each layer, the pattern repeated over the depth."""
    p = self.layer_pattern
    return ''.join(p[i % len(p)] for i in range(self.num_layers))

  def ffn_kinds(self) -> str:
    """'D' (dense MLP) or 'M' (MoE) for each layer."""
    return ''.join(kind for repeats, unit in self.layer_groups() for kind in unit * repeats)

  def layer_slots(self) -> list[tuple[str, str, int]]:
    """Where each layer's parameters live: (stack name, block name, repeat index) in depth order;
    e.g. layer i of a dense model is ('stack0', 'block0', i)."""
    slots = []
    for j, (repeats, unit) in enumerate(self.layer_groups()):
      slots += [(f'stack{j}', f'block{p}', r) for r in range(repeats) for p in range(len(unit))]
    return slots

  def layer_groups(self) -> tuple[tuple[int, str], ...]:
    """The depth as scanned groups: ((repeats, unit), ...), each unit a string of FFN kinds.

    A scan needs identical layers, so a dense model is one group (L, 'D'); Mixtral is (L, 'M');
    MoE every 2nd layer is (L/2, 'DM'); DeepSeek-V3 is (3, 'D'), (58, 'M').
    """
    if self.moe is None:
      return ((self.num_layers, 'D'),)
    n_dense, k = self.moe.first_dense_layers, self.moe.interval
    groups = ((n_dense, 'D'), ((self.num_layers - n_dense) // k, 'D' * (k - 1) + 'M'))
    return tuple(g for g in groups if g[0] > 0)

  # ---- Counting (closed form; tests check it against the built model) -------------------------

  def layer_param_count(self, kind: str = 'D', active: bool = False) -> int:
    """Parameters of one layer with a dense ('D') or MoE ('M') FFN; `active`: per token."""
    d, h = self.d_model, self.head_dim
    attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2   # q, o; k, v
    if kind == 'M':
      ffn = self.moe.layer_param_counts(d, self.gated)[1 if active else 0]
    else:
      ffn = d * self.mlp_dim * (3 if self.gated else 2)
    norms = d * ((1 if self.block == 'parallel' else 2) + (2 if self.post_norms else 0))
    norms += 2 * h if self.qk_norm else 0
    return attn + ffn + norms

  def embedding_param_count(self) -> int:
    return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

  def param_count(self) -> int:
    """All parameters: embeddings, layers and the final norm."""
    layers = sum(self.layer_param_count(kind) for kind in self.ffn_kinds())
    return self.embedding_param_count() + layers + self.d_model * (1 + len(self.heads))

  def active_param_count(self) -> int:
    """Parameters one token uses: the MoE layers count top_k routed experts (+ shared + router)
    instead of all of them (Mixtral 8x7B: 12.9B of 46.7B). Equals `param_count` when dense."""
    layers = sum(self.layer_param_count(kind, active=True) for kind in self.ffn_kinds())
    return self.embedding_param_count() + layers + self.d_model * (1 + len(self.heads))

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token, PaLM (Chowdhery et al. 2022, App. B): 6N + 12·L·H·Q·T.

    N is every *active* parameter (MoE: the experts a token is routed to), as in PaLM, except an
    untied input table: a lookup costs no FLOPs. Attention is counted at full length T without
    causal halving, as in the paper.
    """
    n = self.active_param_count() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)
    return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len
