"""Host-side bookkeeping of the KV page pool: free pages, reference counts and the prefix cache.

A full page of prompt tokens is keyed by a hash chained over every token before it (and a
namespace: the model and adapter), so equal keys mean equal keys/values. A request reuses the
pages of its longest cached prefix (reference count + 1) and prefills only the rest. A page whose
count drops to 0 stays cached in an LRU; allocation takes free pages first and then evicts the
least recently used cached page. A page in use (count > 0) is never evicted. `max_cached_pages`
bounds the idle cached pages (None: as many as the pool holds).

Device arrays never pass through here: the engine turns page ids into page tables.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from model.inference.paged_cache import NULL_PAGE


class OutOfPages(RuntimeError):
  """Not enough free or evictable pages for a request (the engine keeps it waiting)."""


def page_hashes(tokens: Sequence[int], page_size: int, namespace: str = '') -> list[bytes]:
  """Chained digests of the full pages of `tokens`: hash i covers tokens[: (i + 1) * Z]."""
  out, parent = [], hashlib.blake2b(namespace.encode(), digest_size=16).digest()
  arr = np.asarray(tokens, np.int64)
  for i in range(len(tokens) // page_size):
    parent = hashlib.blake2b(parent + arr[i * page_size:(i + 1) * page_size].tobytes(),
                             digest_size=16).digest()
    out.append(parent)
  return out


@dataclasses.dataclass
class PoolStats:
  pages: int            # allocatable pages (the null page excluded)
  free: int             # never used or evicted
  cached_idle: int      # cached, reference count 0 (evictable)
  in_use: int           # reference count > 0
  hit_tokens: int       # prompt tokens served from the prefix cache so far
  lookup_tokens: int    # prompt tokens looked up so far

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class PagePool:
  """Pages 1..num_pages-1 (0 is the null page)."""

  def __init__(self, num_pages: int, page_size: int, max_cached_pages: int | None = None):
    if num_pages < 2:
      raise ValueError(f'serve.num_pages={num_pages} must be >= 2 (page 0 is the null page)')
    if page_size < 1:
      raise ValueError(f'serve.page_size={page_size} must be >= 1')
    self.num_pages, self.page_size = num_pages, page_size
    self.max_cached_pages = max_cached_pages
    self._free = collections.deque(range(1, num_pages))
    self._ref = np.zeros(num_pages, np.int64)
    self._key_of: dict[int, bytes] = {}        # page -> its prefix hash (cached pages only)
    self._page_of: dict[bytes, int] = {}       # prefix hash -> page
    self._idle = collections.OrderedDict()     # cached pages with ref 0, oldest first
    self.hit_tokens = self.lookup_tokens = 0

  # -- queries ----------------------------------------------------------------------------------

  def available(self) -> int:
    """Pages an allocation could get now: free plus idle cached (evictable)."""
    return len(self._free) + len(self._idle)

  def idle_among(self, pages: Sequence[int]) -> int:
    """How many of `pages` are idle cached pages (acquiring them shrinks `available`)."""
    return sum(1 for p in pages if p in self._idle)

  def stats(self) -> PoolStats:
    in_use = int(np.sum(self._ref > 0))
    return PoolStats(self.num_pages - 1, len(self._free), len(self._idle), in_use,
                     self.hit_tokens, self.lookup_tokens)

  def all_free(self) -> bool:
    """True when no page is referenced (everything returned after a load test)."""
    return not np.any(self._ref)

  def match(self, hashes: Sequence[bytes]) -> list[int]:
    """Pages of the longest cached prefix of `hashes` (not yet acquired)."""
    pages = []
    for h in hashes:
      page = self._page_of.get(h)
      if page is None:
        break
      pages.append(page)
    return pages

  # -- changes ----------------------------------------------------------------------------------

  def acquire_prefix(self, hashes: Sequence[bytes], prompt_tokens: int) -> list[int]:
    """Takes a reference on every page of the longest cached prefix; counts hit statistics."""
    pages = self.match(hashes)
    for page in pages:
      self._ref[page] += 1
      self._idle.pop(page, None)
    self.hit_tokens += len(pages) * self.page_size
    self.lookup_tokens += prompt_tokens
    return pages

  def allocate(self, n: int) -> list[int]:
    """n fresh pages (reference count 1), evicting idle cached pages if needed."""
    if n > self.available():
      raise OutOfPages(f'{n} pages wanted, {self.available()} available')
    out = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._idle.popitem(last=False)  # Least recently used.
        self._forget(page)
      self._ref[page] = 1
      out.append(page)
    return out

  def register(self, page: int, key: bytes) -> None:
    """Marks a full, written page as the cached page for prefix hash `key` (first one wins)."""
    if key in self._page_of or page in self._key_of:
      return
    self._page_of[key] = page
    self._key_of[page] = key

  def release(self, pages: Sequence[int]) -> None:
    """Drops one reference per page; cached pages go to the LRU, others back to free."""
    for page in pages:
      if page == NULL_PAGE:
        continue
      if self._ref[page] <= 0:
        raise RuntimeError(f'page {page} released more often than acquired')
      self._ref[page] -= 1
      if self._ref[page]:
        continue
      if page in self._key_of:
        self._idle[page] = None
        self._idle.move_to_end(page)
      else:
        self._free.append(page)
    self._trim()

  def _forget(self, page: int) -> None:
    key = self._key_of.pop(page, None)
    if key is not None:
      del self._page_of[key]

  def _trim(self) -> None:
    if self.max_cached_pages is None:
      return
    while len(self._idle) > self.max_cached_pages:
      page, _ = self._idle.popitem(last=False)
      self._forget(page)
      self._free.append(page)

  def clear_cache(self) -> None:
    """Forgets every idle cached page (e.g. after the weights change)."""
    while self._idle:
      page, _ = self._idle.popitem(last=False)
      self._forget(page)
      self._free.append(page)
