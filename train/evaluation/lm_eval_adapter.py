"""palmax as an EleutherAI lm-evaluation-harness model (`lm_eval --model palmax`).

    from train.evaluation import lm_eval_adapter
    lm = lm_eval_adapter.PalmaxLM(PalmaxModel.load('runs/tiny'))
    lm_eval.simple_evaluate(model=lm, tasks=['my_local_task'], task_manager=...)

or from the shell (the import registers the name):

    python -m launch.eval --workdir=runs/tiny --lm_eval_tasks=hellaswag

The three request types map onto EvalModel's methods, which batch them (log-likelihoods in padded
batches, generations through the serving engine), so the numbers are palmax's own harness's.
"""
from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from train.evaluation.lm import EvalModel, Generation


@register_model('palmax')
class PalmaxLM(LM):
  """`model_args`: workdir=DIR[,step=N,num_slots=S] when lm_eval builds it from a string."""

  def __init__(self, model: EvalModel | None = None, workdir: str | None = None,
               step: int | None = None, num_slots: int | None = None, batch_size=None,
               **_unused):
    super().__init__()
    if model is None:
      if not workdir:
        raise ValueError("the palmax lm_eval model needs model_args 'workdir=DIR'")
      from train.evaluation.lm import PalmaxModel
      model = PalmaxModel.load(workdir, int(step) if step is not None else None,
                               {'num_slots': int(num_slots)} if num_slots else None)
    self.model = model

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = dict(kv.split('=', 1) for kv in arg_string.split(',') if kv)
    return cls(**args)

  @property
  def tokenizer_name(self) -> str:
    return f'palmax:{getattr(self.model, "name", "model")}'

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    return self.model.loglikelihood([tuple(r.args[:2]) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    return [lp for lp, _ in self.model.loglikelihood_rolling([r.args[0] for r in requests])]

  def generate_until(self, requests, disable_tqdm: bool = False):
    # Requests share settings within a task; group by them so each group is one engine batch.
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      kw = dict(r.args[1]) if len(r.args) > 1 else {}
      until = kw.get('until') or ()
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = float(kw.get('temperature', 0.0)) if kw.get('do_sample') else 0.0
      # lm_eval asks 256 new tokens by default: keep half the context for the prompt.
      room = getattr(self.model, 'max_len', 1 << 30) // 2
      gen = Generation(max_tokens=min(int(kw.get('max_gen_toks', 256)), room), until=until,
                       temperature=temperature)
      groups.setdefault((gen,), []).append(i)
    out = [''] * len(requests)
    for (gen,), idx in groups.items():
      for i, (text,) in zip(idx, self.model.generate([requests[i].args[0] for i in idx], gen)):
        out[i] = text
    return out
