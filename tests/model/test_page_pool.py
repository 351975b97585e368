"""PagePool (model/inference/page_pool.py): pages, reference counts, chained-hash prefix cache,
LRU eviction. Pure Python: no device work."""
import pytest

from model.inference.page_pool import OutOfPages, PagePool, page_hashes
from model.inference.paged_cache import NULL_PAGE

Z = 4


def cached_prompt(pool, tokens, namespace=''):
  """Allocates and registers one page per full page of `tokens` (a prefilled prompt); returns
  (pages, hashes). The pages stay referenced."""
  hashes = page_hashes(tokens, pool.page_size, namespace)
  pages = pool.allocate(len(hashes))
  for page, h in zip(pages, hashes):
    pool.register(page, h)
  return pages, hashes


def test_allocate_and_release_count_references():
  """Fresh pages are distinct, never the null page, counted in use; an allocation that does not
  fit raises OutOfPages and changes nothing; releasing returns them."""
  pool = PagePool(6, Z)
  assert pool.available() == 5 and pool.all_free()
  a = pool.allocate(3)
  assert len(set(a)) == 3 and NULL_PAGE not in a and all(1 <= p < 6 for p in a)
  s = pool.stats()
  assert (s.pages, s.free, s.cached_idle, s.in_use) == (5, 2, 0, 3)
  assert not pool.all_free()
  with pytest.raises(OutOfPages):
    pool.allocate(3)
  assert pool.stats().free == 2 and pool.stats().in_use == 3
  b = pool.allocate(2)
  assert set(a).isdisjoint(b) and pool.available() == 0
  pool.release(a + b + [NULL_PAGE])   # The null page is ignored.
  assert pool.all_free() and pool.stats().free == 5 and pool.available() == 5


def test_shared_page_stays_in_use_until_its_last_reference_goes():
  """acquire_prefix adds a reference per matched page; the page is idle only when every holder
  released it."""
  pool = PagePool(8, Z)
  pages, hashes = cached_prompt(pool, list(range(8)))
  assert pool.acquire_prefix(hashes, 9) == pages
  pool.release(pages)                 # The writer lets go; the reader still holds them.
  s = pool.stats()
  assert (s.in_use, s.cached_idle) == (2, 0)
  pool.release(pages)
  s = pool.stats()
  assert (s.in_use, s.cached_idle) == (0, 2) and pool.all_free()


def test_double_release_raises():
  pool = PagePool(4, Z)
  page = pool.allocate(1)
  pool.release(page)
  with pytest.raises(RuntimeError, match='released more often'):
    pool.release(page)
  with pytest.raises(RuntimeError, match='released more often'):
    pool.release([2])                 # Never allocated.


def test_chained_hashes_cover_every_earlier_token_and_the_namespace():
  """Hash i depends on tokens[: (i + 1) * Z] and the namespace only; a partial page has none."""
  tokens = list(range(10, 23))        # 3 full pages + 1 token.
  h = page_hashes(tokens, Z)
  assert len(h) == 3 and len(set(h)) == 3
  assert page_hashes(list(tokens), Z) == h
  assert page_hashes(tokens[:12] + [99], Z) == h   # The partial page is not hashed.
  first = page_hashes([99] + tokens[1:], Z)        # A different first page ...
  assert all(x != y for x, y in zip(first, h))     # ... changes every later hash.
  last = page_hashes(tokens[:8] + [99] + tokens[9:], Z)
  assert last[:2] == h[:2] and last[2] != h[2]
  other = page_hashes(tokens, Z, namespace='adapter-b')
  assert all(x != y for x, y in zip(other, h))
  # Equal pages at different depths get different keys (the chain, not the page, is keyed).
  assert len(set(page_hashes([1, 2, 3, 4] * 3, Z))) == 3
  assert page_hashes(tokens[:3], Z) == []


def test_match_finds_the_longest_cached_prefix():
  pool = PagePool(16, Z)
  a = list(range(100, 116))           # 4 pages.
  pages, hashes = cached_prompt(pool, a)
  assert pool.match(hashes) == pages
  b = a[:8] + [1, 2, 3, 4] + a[12:]   # Page 2 differs: only pages 0, 1 match, not page 3.
  assert pool.match(page_hashes(b, Z)) == pages[:2]
  assert pool.match(page_hashes([0] + a[1:], Z)) == []
  assert pool.match(page_hashes(a[:6], Z)) == pages[:1]
  assert pool.match(page_hashes(a, Z, namespace='other-model')) == []
  pool.release(pages)


def test_register_keeps_the_first_page_for_a_key():
  """Two sequences writing the same prefix: the first registered page serves later matches."""
  pool = PagePool(8, Z)
  first, hashes = cached_prompt(pool, [5] * 8)
  second = pool.allocate(2)
  for page, h in zip(second, hashes):
    pool.register(page, h)
  pool.register(first[0], b'another-key')   # A cached page keeps its key.
  assert pool.match(hashes) == first
  assert pool.match([b'another-key']) == []
  pool.release(second)
  assert pool.stats().cached_idle == 0 and pool.stats().free == 5   # Uncached: back to free.
  pool.release(first)
  assert pool.stats().cached_idle == 2


def test_released_cached_pages_wait_in_the_lru_and_serve_a_later_match():
  pool = PagePool(8, Z)
  pages, hashes = cached_prompt(pool, list(range(12)))
  pool.release(pages)
  s = pool.stats()
  assert (s.free, s.cached_idle, s.in_use) == (4, 3, 0)
  assert pool.available() == 7        # Idle cached pages are still allocatable.
  got = pool.acquire_prefix(hashes[:2], 9)
  assert got == pages[:2]
  s = pool.stats()
  assert (s.cached_idle, s.in_use) == (1, 2)
  assert pool.available() == 5
  pool.release(got)
  assert pool.all_free()


def test_eviction_takes_the_least_recently_used_page_first():
  pool = PagePool(5, Z)               # 4 allocatable pages.
  p = {}
  for name in 'abc':                  # Three one-page prompts, cached and released in order.
    pages, hashes = cached_prompt(pool, [ord(name)] * Z)
    p[name] = (pages[0], hashes)
    pool.release(pages)
  pool.release(pool.acquire_prefix(p['a'][1], Z))   # Touch a: LRU order is now b, c, a.
  (fresh,) = pool.allocate(1)         # The one never-used page goes first.
  assert fresh not in {v[0] for v in p.values()}
  assert pool.allocate(1) == [p['b'][0]]
  assert pool.match(p['b'][1]) == []  # Evicted: its key is forgotten.
  assert pool.allocate(1) == [p['c'][0]]
  assert pool.match(p['a'][1]) == [p['a'][0]]
  assert pool.allocate(1) == [p['a'][0]]
  assert pool.match(p['a'][1]) == []
  pool.release([fresh, p['a'][0], p['b'][0], p['c'][0]])
  assert pool.all_free() and pool.stats().free == 4


def test_eviction_never_takes_a_page_in_use():
  """A pool full of referenced pages (some of them cached) has nothing to give: OutOfPages, and
  every cached page in use still matches."""
  pool = PagePool(7, Z)               # 6 allocatable pages.
  pages, hashes = cached_prompt(pool, list(range(3 * Z)))
  reader = pool.acquire_prefix(hashes, 3 * Z + 1)   # A second holder of the cached pages.
  pool.release(pages)                 # The writer finished: still in use by the reader.
  others = pool.allocate(3)
  assert pool.available() == 0
  with pytest.raises(OutOfPages):
    pool.allocate(1)
  assert pool.match(hashes) == pages and pool.stats().in_use == 6
  # Once the reader lets go, those pages (and only those) become evictable.
  pool.release(reader)
  assert pool.available() == 3
  assert sorted(pool.allocate(3)) == sorted(pages)
  assert pool.match(hashes) == []
  pool.release(others + pages)
  assert pool.all_free()


def test_max_cached_pages_bounds_the_idle_cache():
  pool = PagePool(10, Z, max_cached_pages=2)
  pages, hashes = cached_prompt(pool, list(range(4 * Z)))
  assert pool.stats().cached_idle == 0          # In use: not counted against the bound.
  pool.release(pages)                           # Released in page order: the last two stay.
  s = pool.stats()
  assert (s.cached_idle, s.free) == (2, 7)
  assert pool.match(hashes) == []               # The chain breaks at the evicted first page.
  assert all(pool.match([h]) == [p] for p, h in zip(pages[2:], hashes[2:]))
  assert all(pool.match([h]) == [] for h in hashes[:2])


def test_clear_cache_forgets_idle_pages_only():
  pool = PagePool(10, Z)
  idle, idle_h = cached_prompt(pool, [1] * (2 * Z))
  busy, busy_h = cached_prompt(pool, [2] * (2 * Z))
  pool.release(idle)
  pool.clear_cache()
  s = pool.stats()
  assert (s.cached_idle, s.in_use, s.free) == (0, 2, 7)
  assert pool.match(idle_h) == [] and pool.match(busy_h) == busy
  pool.release(busy)
  assert pool.stats().cached_idle == 2


def test_hit_statistics_count_prompt_tokens():
  pool = PagePool(16, Z)
  assert pool.stats().hit_rate == 0.0
  pages, hashes = cached_prompt(pool, list(range(3 * Z)))
  pool.release(pages)
  got = pool.acquire_prefix(hashes[:2], 10)    # 2 pages of a 10-token prompt were cached.
  miss = pool.acquire_prefix(page_hashes([7] * (2 * Z), Z), 9)
  assert miss == []
  s = pool.stats()
  assert (s.hit_tokens, s.lookup_tokens) == (2 * Z, 19)
  assert s.hit_rate == pytest.approx(8 / 19)
  pool.release(got)


@pytest.mark.parametrize('kwargs, match', [(dict(num_pages=1, page_size=4), 'num_pages'),
                                           (dict(num_pages=8, page_size=0), 'page_size')])
def test_bad_pool_sizes_are_refused_by_name(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PagePool(**kwargs)
