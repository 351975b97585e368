"""Side-by-side pairs for human raters, and their labels back in.

    items = export_html('sbs.html', pairs)   # pairs: [{prompt, a, b}]; returns them with an `id`
    # ... a rater opens sbs.html, picks A / B / tie per pair, and downloads labels.jsonl ...
    labels = import_labels('labels.jsonl', items)   # ['a', 'tie', ...], aligned with items

An item's `id` is a hash of its (prompt, a, b), so the same pair has the same id in every export
and labels can come back in any order, from JSONL ({"id", "label"} lines) or a CSV with `id` and
`label` columns. Only id, prompt, a and b are exported: a rater must not see reference labels.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import pathlib
from typing import Sequence

LABELS = ('a', 'b', 'tie')


def item_id(item: dict) -> str:
  """A stable 16-hex-digit id of the pair (prompt, a, b)."""
  key = json.dumps([item['prompt'], item['a'], item['b']], ensure_ascii=False)
  return hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]


def with_ids(items: Sequence[dict]) -> list[dict]:
  """Copies of `items` (dicts with string prompt, a, b), each with an `id` (its own if it has
  one, else `item_id`); ids must be unique."""
  out, seen = [], {}
  for i, item in enumerate(items):
    for key in ('prompt', 'a', 'b'):
      if not isinstance(item, dict) or not isinstance(item.get(key), str):
        raise ValueError(f'item {i}: expected a dict with a string {key!r}, got {item!r:.80}')
    item = dict(item)
    item['id'] = item_id(item) if item.get('id') in (None, '') else str(item['id'])
    if item['id'] in seen:
      raise ValueError(f'item {i}: id {item["id"]!r} repeats item {seen[item["id"]]} (the same '
                       'pair twice?)')
    seen[item['id']] = i
    out.append(item)
  return out


def export_jsonl(path, items: Sequence[dict]) -> list[dict]:
  """One {"id", "prompt", "a", "b"} line per item; returns the items with their ids."""
  items = with_ids(items)
  with open(path, 'w', encoding='utf-8') as f:
    for item in items:
      f.write(json.dumps({k: item[k] for k in ('id', 'prompt', 'a', 'b')}, ensure_ascii=False)
              + '\n')
  return items


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 80em; }}
.item {{ border: 1px solid #bbb; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
.text {{ white-space: pre-wrap; font-family: monospace; background: #f6f6f6; padding: .5em; }}
h3 {{ margin: .3em 0; }}
</style></head><body>
<h1>{title}</h1>
<p>{count} pairs. For each, pick the better response (or tie), then download the labels.</p>
{body}
<button id="download">Download labels (JSONL)</button> <span id="status"></span>
<script>
document.getElementById('download').onclick = function () {{
  var lines = [], missing = 0;
  document.querySelectorAll('fieldset.item').forEach(function (fs) {{
    var picked = fs.querySelector('input:checked');
    if (picked) {{ lines.push(JSON.stringify({{id: fs.dataset.id, label: picked.value}})); }}
    else {{ missing += 1; }}
  }});
  document.getElementById('status').textContent =
      lines.length + ' labelled' + (missing ? ', ' + missing + ' not yet' : '');
  var blob = new Blob([lines.join('\\n') + '\\n'], {{type: 'application/jsonl'}});
  var link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'labels.jsonl';
  link.click();
}};
</script>
</body></html>
"""

_ITEM = """<fieldset class="item" data-id="{id}"><legend>#{n} <code>{id}</code></legend>
<h3>Prompt</h3><div class="text">{prompt}</div>
<div class="pair"><div><h3>Response A</h3><div class="text">{a}</div></div>
<div><h3>Response B</h3><div class="text">{b}</div></div></div>
<p>{radios}</p></fieldset>"""


def export_html(path, items: Sequence[dict], title: str = 'Side-by-side rating') -> list[dict]:
  """A self-contained page (no network): per item the prompt, responses A and B side by side and
  A / B / tie radio buttons; a button downloads the choices as JSONL for `import_labels`. Every
  text is HTML-escaped. Returns the items with their ids."""
  items = with_ids(items)
  esc = lambda s: html.escape(s, quote=True)
  parts = []
  for n, item in enumerate(items):
    radios = ' '.join(
        f'<label><input type="radio" name="item-{n}" value="{v}"> {v if v == "tie" else v.upper()}'
        '</label>' for v in LABELS)
    parts.append(_ITEM.format(id=esc(item['id']), n=n + 1, prompt=esc(item['prompt']),
                              a=esc(item['a']), b=esc(item['b']), radios=radios))
  pathlib.Path(path).write_text(
      _PAGE.format(title=esc(title), count=len(items), body='\n'.join(parts)), encoding='utf-8')
  return items


def _rows(path: str):
  """(line number, id, label) of every labelled row of a JSONL or (by suffix .csv) CSV file."""
  with open(path, encoding='utf-8', newline='') as f:
    if str(path).lower().endswith('.csv'):
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {'id', 'label'} <= {c.strip() for c in reader.fieldnames}:
        raise ValueError(f'{path}:1: expected a CSV header with id and label columns, got '
                         f'{reader.fieldnames!r}')
      for row in reader:
        row = {(k or '').strip(): v for k, v in row.items()}
        if row.get('id') is None or row.get('label') is None:
          raise ValueError(f'{path}:{reader.line_num}: expected id and label values')
        yield reader.line_num, row['id'].strip(), row['label']
      return
    for line_num, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_num}: not JSON ({e.msg})') from None
      if not isinstance(row, dict) or not isinstance(row.get('id'), str) or 'label' not in row:
        raise ValueError(f'{path}:{line_num}: expected an object with a string "id" and a '
                         f'"label", got {line.strip()[:80]!r}')
      yield line_num, row['id'], row['label']


def import_labels(path, items: Sequence[dict]) -> list[str]:
  """Raters' labels ('a' | 'b' | 'tie'; case and spaces ignored) aligned with `items` (the
  exported ones, or the same pairs: ids are recomputed). Raises ValueError naming the file and
  line for a malformed line, an unknown id, a bad label or a repeated id, and naming how many
  items have no label."""
  items = with_ids(items)
  index = {item['id']: i for i, item in enumerate(items)}
  labels: list[str | None] = [None] * len(items)
  first_line: dict[str, int] = {}
  for line_num, id_, label in _rows(str(path)):
    if id_ not in index:
      raise ValueError(f'{path}:{line_num}: unknown id {id_!r} (not among the {len(items)} items)')
    if id_ in first_line:
      raise ValueError(f'{path}:{line_num}: duplicate id {id_!r} (first on line '
                       f'{first_line[id_]})')
    norm = label.strip().lower() if isinstance(label, str) else label
    if norm not in LABELS:
      raise ValueError(f'{path}:{line_num}: label {label!r} is not one of {", ".join(LABELS)}')
    first_line[id_] = line_num
    labels[index[id_]] = norm
  missing = [items[i]['id'] for i, label in enumerate(labels) if label is None]
  if missing:
    raise ValueError(f'{path}: {len(missing)} of {len(items)} items have no label (first: '
                     f'{missing[0]!r})')
  return labels


def pairs_from_results(results_a: dict, results_b: dict, spec: str) -> list[dict]:
  """Side-by-side items from two `launch.eval` results (two models, or two prompting styles)
  on the same generation task variant `spec`: one per example both answered, `a` the first
  run's response and `b` the second's. Which is shown on the left is the rater's concern: the
  HTML page presents them as A and B; swap the arguments for a second pass to measure bias."""
  runs = []
  for name, res in (('first', results_a), ('second', results_b)):
    task = res.get('tasks', {}).get(spec)
    if task is None:
      raise ValueError(f'the {name} results have no task {spec!r} (they have '
                       f'{sorted(res.get("tasks", {}))})')
    if task['kind'] != 'generate':
      raise ValueError(f'{spec!r} is a {task["kind"]} task; side by side compares generations')
    runs.append({r['id']: r for r in task['records']})
  common = [i for i in runs[0] if i in runs[1]]
  if not common:
    raise ValueError(f'the two results share no example of {spec!r}')
  return with_ids([{'prompt': runs[0][i]['prompt'], 'a': runs[0][i]['response'],
                    'b': runs[1][i]['response'], 'example': i} for i in common])


def win_rate(labels: Sequence[str]) -> dict:
  """How often `a` is preferred, a tie counting half, with a 95% bootstrap interval."""
  from train.evaluation.metrics import summarize
  bad = [x for x in labels if x not in LABELS]
  if bad:
    raise ValueError(f'labels must be in {LABELS}, got {bad[0]!r}')
  return summarize([{'a': 1.0, 'b': 0.0, 'tie': 0.5}[x] for x in labels])
