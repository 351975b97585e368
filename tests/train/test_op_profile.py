"""The per-component profile: ops are attributed to the named scope they came from (forward and
backward), and the times come from a real profiler trace."""
import jax
import jax.numpy as jnp

from train import op_profile


def _step(a, b):
  def f(a, b):
    with jax.named_scope('mlp'):
      c = jnp.tanh(a @ b)
    with jax.named_scope('head_loss'):
      return jnp.sum(jnp.exp(c @ b) * 1e-3)
  return jax.grad(f)(a, b)


def test_ops_are_attributed_to_their_scopes_and_timed():
  a = jnp.ones((256, 256)) * 0.01
  compiled = jax.jit(_step).lower(a, a).compile()
  owner = op_profile.instruction_scopes(compiled.as_text(), ('mlp', 'head_loss'))
  assert {'mlp', 'head_loss'} <= set(owner.values())
  ms = op_profile.breakdown(compiled.as_text(), lambda: compiled(a, a), 2, ('mlp', 'head_loss'))
  assert set(ms) == {'mlp', 'head_loss', 'other'}
  assert ms['mlp'] > 0 and ms['head_loss'] > 0


def test_scope_matching_sees_through_transforms_and_not_substrings():
  text = '\n'.join([
      'ENTRY %main (p: f32[2]) -> f32[2] {',
      '  %a = f32[2] add(%p, %p), metadata={op_name="jit(f)/transpose(jvp(mlp))/add"}',
      '  %b = f32[2] add(%a, %a), metadata={op_name="jit(f)/mlpx/add"}',
      '  ROOT %c = f32[2] fusion(%b), kind=kLoop, calls=%fused_computation',
      '}'])
  owner = op_profile.instruction_scopes(text, ('mlp',))
  assert owner['a'] == 'mlp' and owner['b'] == 'other'
