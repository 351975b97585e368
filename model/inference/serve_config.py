"""The serving engine's settings (`config.serve`): one dataclass, so configs/base.py, the schema
and `launch.serve` flags share one set of defaults."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  num_slots: int = 16         # sequences decoded together (the decode step's fixed batch)
  page_size: int = 16         # tokens per KV page
  num_pages: int = 0          # 0 = every slot at full context twice over (half for the prefix cache)
  prefill_chunk: int = 64     # prompt tokens per prefill step (one compiled shape; >= 64 keeps
                              # XLA:CPU's matmul rows independent of their neighbours)
  max_queue: int = 256        # waiting sequences before requests get 429
  prefix_cache: bool = True   # reuse cached pages of shared prompt prefixes
  max_cached_pages: int = 0   # idle cached pages kept (0 = no bound but the pool)
  max_top_logprobs: int = 20  # largest `logprobs` / `top_logprobs` a request may ask for
  max_n: int = 16             # largest `n` / `best_of`

  def pages_per_seq(self, max_seq_len: int) -> int:
    return math.ceil(max_seq_len / self.page_size)

  def total_pages(self, max_seq_len: int) -> int:
    """Pool size including the null page."""
    if self.num_pages:
      return self.num_pages
    return 1 + 2 * self.num_slots * self.pages_per_seq(max_seq_len)

  def validate(self, where: str = 'config.serve.') -> 'ServeConfig':
    for name in ('num_slots', 'page_size', 'prefill_chunk', 'max_queue', 'max_n'):
      if getattr(self, name) < 1:
        raise ValueError(f'{where}{name}={getattr(self, name)} must be >= 1')
    for name in ('num_pages', 'max_cached_pages', 'max_top_logprobs'):
      if getattr(self, name) < 0:
        raise ValueError(f'{where}{name}={getattr(self, name)} must be >= 0')
    if self.num_pages == 1:
      raise ValueError(f'{where}num_pages=1 must be 0 (auto) or >= 2 (page 0 is the null page)')
    return self

  @classmethod
  def from_dict(cls, d) -> 'ServeConfig':
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'config.serve has unknown field(s) {unknown}; expected some of '
                       f'{sorted(known)}')
    return cls(**d).validate()
