"""Logit parity with Hugging Face transformers for tiny random Llama/Mistral/Mixtral/Gemma 1/2/3
models, full and cached (prefill + several single-token steps), with sliding windows shorter than
the sequence; config mapping both ways; weight round trips."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from model import hf, transformer  # noqa: E402

B, T, PREFILL, TOL = 2, 12, 6, 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, initializer_range=0.15,
              attn_implementation='eager')
LLAMA3 = {'rope_type': 'llama3', 'rope_theta': 10_000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}

FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(num_hidden_layers=2, **COMMON),
    'llama3_rope': lambda: transformers.LlamaConfig(num_hidden_layers=2, rope_parameters=LLAMA3,
                                                    **COMMON),
    'mistral': lambda: transformers.MistralConfig(num_hidden_layers=2, sliding_window=4, **COMMON),
    # Mixtral: 4 experts, top-2, softmax over the kept logits; sliding window 4 < T.
    'mixtral': lambda: transformers.MixtralConfig(num_hidden_layers=2, sliding_window=4,
                                                  num_local_experts=4, num_experts_per_tok=2,
                                                  router_aux_loss_coef=0.02, **COMMON),
    'gemma': lambda: transformers.GemmaConfig(num_hidden_layers=2, **COMMON),
    'gemma2': lambda: transformers.Gemma2Config(num_hidden_layers=4, sliding_window=4,
                                                query_pre_attn_scalar=24,
                                                attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0, **COMMON),
    'gemma3_text': lambda: transformers.Gemma3TextConfig(
        num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=16,
        rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0},
                         'full_attention': {'rope_type': 'default', 'rope_theta': 1_000_000.0}},
        **COMMON),
    # Gemma 3 4B+: linear position interpolation (factor 8) on global layers only.
    'gemma3_linear_rope': lambda: transformers.Gemma3TextConfig(
        num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=16,
        rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0},
                         'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                            'rope_theta': 1_000_000.0}},
        **COMMON),
}

_CACHE = {}


def _randomise_norms(model):
  """HF inits norm gains to 0 (Gemma) or 1: perturb them so a mapped-wrong norm is caught."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _hf_model(name):
  if name not in _CACHE:
    torch.manual_seed(0)
    hf_cfg = FAMILIES[name]()
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation='eager')
    model = model.float().eval()
    _randomise_norms(model)
    tokens = np.random.default_rng(0).integers(3, hf_cfg.vocab_size, (B, T))
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens)).logits.float().numpy()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    _CACHE[name] = (hf_cfg, sd, tokens, logits)
  return _CACHE[name]


def _palmax_fn(name):
  hf_cfg, sd, _, _ = _hf_model(name)
  cfg = hf.config_from_hf(hf_cfg)
  params = jax.tree.map(jnp.asarray, hf.params_from_hf(sd, cfg))
  graphdef, _ = nnx.split(transformer.abstract(cfg))

  @jax.jit
  def f(params, tokens, cache=None, index=0):
    return nnx.merge(graphdef, params)(tokens, cache, index)

  return cfg, lambda tokens, cache=None, index=0: f(params, tokens, cache, index)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_logits_match_hf_full_and_cached(name):
  _, _, tokens, want = _hf_model(name)
  cfg, f = _palmax_fn(name)
  toks = jnp.asarray(tokens, jnp.int32)
  got, _ = f(toks)
  full_err = float(np.max(np.abs(np.asarray(got) - want)))

  cache = transformer.init_cache(cfg, B, T)
  steps = []
  logits, cache = f(toks[:, :PREFILL], cache, 0)
  steps.append(logits)
  for i in range(PREFILL, T):
    logits, cache = f(toks[:, i:i + 1], cache, i)
    steps.append(logits)
  cached_err = float(np.max(np.abs(np.concatenate([np.asarray(s) for s in steps], 1) - want)))
  print(f'\n[hf parity] {name}: max|dlogits| full={full_err:.2e} cached={cached_err:.2e} '
        f'(logit scale {np.abs(want).max():.2f})')
  assert full_err < TOL, (name, full_err)
  assert cached_err < TOL, (name, cached_err)


def test_config_mapping_details():
  c = hf.config_from_hf(FAMILIES['gemma2']())
  assert (c.layer_pattern, c.sliding_window, c.query_scale_dim) == ('LG', 4, 24)
  assert (c.attn_softcap, c.logit_softcap, c.post_norms, c.qk_norm) == (5.0, 3.0, True, False)
  assert c.activation == 'geglu' and c.norm_offset_one and c.scale_embeddings and c.tie_embeddings
  c = hf.config_from_hf(FAMILIES['gemma3_text']())
  assert (c.layer_pattern, c.qk_norm, c.rope_base, c.rope_base_local) == ('LLLLLG', True, 1e6, 1e4)
  assert c.query_scale_dim == 0  # query_pre_attn_scalar == head_dim.
  c = hf.config_from_hf(FAMILIES['mistral']())
  assert (c.layer_pattern, c.sliding_window) == ('L', 4)
  c = hf.config_from_hf(FAMILIES['llama3_rope']())
  assert (c.rope_scaling, c.rope_scaling_factor, c.rope_original_max_len) == ('llama3', 8.0, 32)
  assert c.activation == 'swiglu' and not c.tie_embeddings and not c.norm_offset_one


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match='gpt2'):
    hf.config_from_hf(transformers.GPT2Config())
  with pytest.raises(ValueError, match='attention_bias'):
    hf.config_from_hf(transformers.LlamaConfig(attention_bias=True, **COMMON))
  with pytest.raises(ValueError, match='rope_type'):
    hf.config_from_hf(transformers.LlamaConfig(
        rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 2.0}, **COMMON))
  with pytest.raises(ValueError, match='hidden_act'):
    hf.config_from_hf(transformers.LlamaConfig(hidden_act='relu', **COMMON))


@pytest.mark.parametrize('name', ['llama', 'gemma2', 'gemma3_text'])
def test_round_trip_is_bit_identical(name):
  hf_cfg, sd, _, _ = _hf_model(name)
  cfg = hf.config_from_hf(hf_cfg)
  back = hf.params_to_hf(hf.params_from_hf(sd, cfg), cfg)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    assert np.array_equal(back[k], sd[k]), k


def test_missing_and_misshapen_tensors_are_named():
  hf_cfg, sd, _, _ = _hf_model('llama')
  cfg = hf.config_from_hf(hf_cfg)
  bad = dict(sd)
  del bad['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf.params_from_hf(bad, cfg)
  bad = dict(sd)
  bad['model.layers.0.self_attn.k_proj.weight'] = np.zeros((16, 64), np.float32)
  with pytest.raises(ValueError, match=r"k_proj\.weight.*\(16, 64\).*expected \(32, 64\)"):
    hf.params_from_hf(bad, cfg)


def test_mixtral_fused_state_dict_round_trips_to_hub_names():
  # transformers 5 holds experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D]); export
  # writes the per-expert hub names (block_sparse_moe.experts.{e}.w1/w2/w3) that every
  # transformers version loads. Values must match bit for bit.
  hf_cfg, sd, _, _ = _hf_model('mixtral')
  cfg = hf.config_from_hf(hf_cfg)
  assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.gating) == (4, 2, 'topk_softmax')
  assert cfg.moe.aux_loss_coef == pytest.approx(0.04)  # HF sums over k choices, palmax averages.
  back = hf.params_to_hf(hf.params_from_hf(sd, cfg), cfg)
  f = cfg.moe.expert_mlp_dim
  for i in range(cfg.num_layers):
    gu, down = sd[f'model.layers.{i}.mlp.experts.gate_up_proj'], sd[f'model.layers.{i}.mlp.experts.down_proj']
    pre = f'model.layers.{i}.block_sparse_moe.'
    assert np.array_equal(back[pre + 'gate.weight'], sd[f'model.layers.{i}.mlp.gate.weight'])
    for e in range(cfg.moe.num_experts):
      assert np.array_equal(back[f'{pre}experts.{e}.w1.weight'], gu[e, :f])
      assert np.array_equal(back[f'{pre}experts.{e}.w3.weight'], gu[e, f:])
      assert np.array_equal(back[f'{pre}experts.{e}.w2.weight'], down[e])
  # The hub names read back to the same palmax params.
  again = hf.params_from_hf(back, cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, hf.params_from_hf(sd, cfg))


@pytest.mark.parametrize('name', list(FAMILIES))
def test_config_to_hf_inverts_config_from_hf(name):
  cfg = hf.config_from_hf(FAMILIES[name]())
  family = hf.family_of(FAMILIES[name]())
  d = hf.config_to_hf(cfg, family)
  assert hf.config_from_hf(d) == cfg
  # transformers itself accepts the dict and reads it back to the same model.
  hf_cfg = transformers.AutoConfig.for_model(**d)
  assert hf.config_from_hf(hf_cfg) == cfg


def test_config_to_hf_names_what_the_family_cannot_hold():
  cfg = hf.config_from_hf(FAMILIES['gemma2']())
  with pytest.raises(ValueError, match=r'no HF llama equivalent for: .*attn_softcap=5\.0'):
    hf.config_to_hf(cfg, 'llama')
  with pytest.raises(ValueError, match='block'):
    hf.config_to_hf(dataclasses.replace(cfg, block='parallel'), 'gemma2')
  with pytest.raises(ValueError, match='dense model has no HF mixtral'):
    hf.config_to_hf(hf.config_from_hf(FAMILIES['mistral']()), 'mixtral')
  with pytest.raises(ValueError, match="unknown family 'gpt2'"):
    hf.config_to_hf(cfg, 'gpt2')
