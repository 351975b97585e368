"""The policy as RL's rollout stage sees it: the serving engine sampling with the trainer's live
parameters (handed over in memory, no checkpoint round trip), and one jitted forward that scores
the sampled rows (log-probs of the policy and the reference, the value head).

    policy = Policy(run)                      # one engine and one scorer for the whole run
    policy.set_params(state['params'])        # each step, before sampling
    samples = policy.sample(requests, log)    # a step that raises fails its sequences only
    out = policy.score(tokens_BT1, mask_BT)   # {'logps', 'ref_logps', 'values'} [B, T]
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import sharding
from train.objectives.logprobs import token_logps


@dataclasses.dataclass
class Sample:
  """One generated completion: its token ids (EOS included when it stopped), how it ended
  ('stop', 'length', or 'error' when its rollout failed) and why it failed."""
  tokens: list[int]
  finish: str
  error: str = ''


class Policy:
  """Engine + scorer over the run's graphdef, on the run's mesh (module docstring)."""
  step_hook: Callable[[], None] | None = None   # Runs before each engine step (tests fail it).

  def __init__(self, graphdef, model_cfg, serve_cfg, tokenizer, *, mesh, rules, temperature: float,
               ref_params=None, use_reference: bool = False, values: bool = False,
               namespace: str = 'rl'):
    self.graphdef, self.model_cfg, self.serve_cfg = graphdef, model_cfg, serve_cfg
    self.tokenizer, self.mesh, self.rules = tokenizer, mesh, rules
    self.temperature, self.ref_params = temperature, ref_params
    self.use_reference, self.values = use_reference, values
    self.namespace, self.version = namespace, 0
    self.engine = None
    self.params = None
    self._score = jax.jit(self._score_fn)

  def set_params(self, params) -> None:
    """The trainer's current parameters (same shapes and shardings every call: no recompile).
    Prefix-cache pages of older parameters never match again (a new namespace)."""
    from model.inference.engine import Engine
    self.params = params
    self.version += 1
    if self.engine is None:
      self.engine = Engine(self.graphdef, params, self.model_cfg, self.serve_cfg,
                           eos_id=self.tokenizer.eos_id, vocab_limit=self.tokenizer.vocab_size,
                           namespace=f'{self.namespace}/{self.version}', mesh=self.mesh,
                           rules=self.rules)
    self.engine.params = params
    self.engine.namespace = f'{self.namespace}/{self.version}'

  def sample(self, requests: Sequence, log=print) -> list[Sample]:
    """Runs engine GenerationRequests to the end. An engine step that raises (a rollout
    worker dying mid-generation) ends the sequences it was running with finish 'error' and a
    logged line; the rest go on."""
    out = [Sample([], '') for _ in requests]

    def collect(i):
      def on_event(ev):
        if ev.token is not None:
          out[i].tokens.append(int(ev.token))
        if ev.finish is not None:
          out[i].finish = ev.finish
      return on_event

    for i, r in enumerate(requests):
      self.engine.submit(r, collect(i))
    while self.engine.has_work():
      try:
        if self.step_hook is not None:
          self.step_hook()
        self.engine.step()
      except Exception as e:   # pylint: disable=broad-except  (fail those samples, not the run)
        running = [s.id for s in self.engine.slots if s is not None]
        log(f'rollout: an engine step failed ({type(e).__name__}: {e}); ending its '
            f'{len(running)} running samples as failed')
        self.engine.abort_running('error')
        for s in out:
          if s.finish == 'error' and not s.error:
            s.error = f'generation failed: {type(e).__name__}: {e}'
    return out

  def _score_fn(self, params, ref_params, tokens_BT1, mask_BT):
    from train.step import ReferenceForward
    model = nnx.merge(self.graphdef, params)
    inputs, targets = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    x_BTD, _, _ = model.forward(inputs, hidden=True)
    logits_BTV = model.embedder.decode(x_BTD) / self.temperature
    out = {'logps': token_logps(logits_BTV, targets, mask_BT)[0]}
    if self.values:
      from model import heads
      out['values'] = heads.score(model, x_BTD, 'value') * mask_BT
    if self.use_reference:
      ref = ReferenceForward(model if ref_params is None else nnx.merge(self.graphdef, ref_params),
                             ref_params is None)
      out['ref_logps'] = token_logps(ref(inputs) / self.temperature, targets, mask_BT)[0]
    return out

  def score(self, tokens_BT1: np.ndarray, mask_BT: np.ndarray) -> dict[str, np.ndarray]:
    """{'logps', and 'values' / 'ref_logps' when asked for}: float32 [B, T] of the current
    parameters, zero off the mask."""
    out = self._score(self.params, self.ref_params, jnp.asarray(tokens_BT1, jnp.int32),
                      jnp.asarray(mask_BT, jnp.float32))
    return {k: np.asarray(v) for k, v in sharding.to_host(out).items()}

