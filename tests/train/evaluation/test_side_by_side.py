"""Side-by-side export for human raters (JSONL, HTML) and import of their labels."""
import json

import pytest

from train.evaluation.side_by_side import (export_html, export_jsonl, import_labels, item_id,
                                           with_ids)

PAIRS = [dict(prompt='What is 2 + 2?', a='4', b='5', label='a'),
         dict(prompt='Say hi & <b>bye</b>', a='<script>alert("x")</script>', b="it's fine"),
         dict(prompt='Multi\nline', a='one\ntwo', b='three', id='custom-id')]


def test_ids_are_stable_and_unique():
  items = with_ids(PAIRS)
  assert items[0]['id'] == item_id(PAIRS[0]) == with_ids(PAIRS)[0]['id']
  assert len(items[0]['id']) == 16 and items[2]['id'] == 'custom-id'
  assert 'id' not in PAIRS[0]   # Copies: the caller's items are left alone.
  assert item_id(dict(prompt='ab', a='c', b='')) != item_id(dict(prompt='a', a='bc', b=''))
  with pytest.raises(ValueError, match='item 1: id .* repeats item 0'):
    with_ids([PAIRS[0], PAIRS[0]])
  with pytest.raises(ValueError, match="item 0: expected a dict with a string 'b'"):
    with_ids([dict(prompt='p', a='x')])


def test_jsonl_round_trip(tmp_path):
  path = tmp_path / 'sbs.jsonl'
  items = export_jsonl(path, PAIRS)
  rows = [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]
  assert rows == [{k: it[k] for k in ('id', 'prompt', 'a', 'b')} for it in items]
  assert 'label' not in rows[0]   # Raters must not see reference labels.
  assert with_ids(rows) == rows


def test_html_is_self_contained_and_escaped(tmp_path):
  path = tmp_path / 'sbs.html'
  items = export_html(path, PAIRS, title='Rate <these>')
  page = path.read_text(encoding='utf-8')
  assert '<script>alert' not in page and '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;' in page
  assert 'Say hi &amp; &lt;b&gt;bye&lt;/b&gt;' in page and 'it&#x27;s fine' in page
  assert 'Rate &lt;these&gt;' in page and 'http' not in page   # No network resources.
  assert page.count('<script>') == 1 and 'labels.jsonl' in page
  for n, it in enumerate(items):
    assert f'data-id="{it["id"]}"' in page
    for v in ('a', 'b', 'tie'):
      assert f'name="item-{n}" value="{v}"' in page


def write(path, lines):
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return path


def test_import_labels_jsonl_and_csv(tmp_path):
  items = with_ids(PAIRS)
  ids = [it['id'] for it in items]
  path = write(tmp_path / 'labels.jsonl', [json.dumps(dict(id=ids[2], label='tie')), '',
                                           json.dumps(dict(id=ids[0], label='A')),
                                           json.dumps(dict(id=ids[1], label='b'))])
  assert import_labels(path, PAIRS) == ['a', 'b', 'tie']   # Recomputed ids; any order.
  csv_path = write(tmp_path / 'labels.csv', ['id,label,rater', f'{ids[1]},a,x', f'{ids[0]},b,y',
                                             f'{ids[2]}, tie ,z'])
  assert import_labels(csv_path, items) == ['b', 'a', 'tie']


@pytest.mark.parametrize('lines, match', [
    (['{"id": "ID0", "label": "a"}', 'not json'], r'labels.jsonl:2: not JSON'),
    (['["ID0", "a"]'], r'labels.jsonl:1: expected an object'),
    (['{"id": "ID0"}'], r'labels.jsonl:1: expected an object'),
    (['{"id": "nope", "label": "a"}'], r"labels.jsonl:1: unknown id 'nope'"),
    (['{"id": "ID0", "label": "c"}'], r"labels.jsonl:1: label 'c' is not one of a, b, tie"),
    (['{"id": "ID0", "label": 1}'], r'labels.jsonl:1: label 1 is not one of'),
    (['{"id": "ID0", "label": "a"}', '', '{"id": "ID0", "label": "b"}'],
     r"labels.jsonl:3: duplicate id 'ID0' \(first on line 1\)"),
    (['{"id": "ID0", "label": "a"}'], r'labels.jsonl: 2 of 3 items have no label'),
    ([], r'labels.jsonl: 3 of 3 items have no label'),
])
def test_import_labels_bad_jsonl(tmp_path, lines, match):
  ids = [it['id'] for it in with_ids(PAIRS)]
  path = write(tmp_path / 'labels.jsonl', [line.replace('ID0', ids[0]) for line in lines])
  with pytest.raises(ValueError, match=match.replace('ID0', ids[0])):
    import_labels(path, PAIRS)


@pytest.mark.parametrize('lines, match', [
    (['id,choice', 'x,a'], r'labels.csv:1: expected a CSV header with id and label'),
    ([], r'labels.csv:1: expected a CSV header'),
    (['id,label', 'ID0'], r'labels.csv:2: expected id and label values'),
    (['id,label', 'ID0,a', 'ID0,b'], r"labels.csv:3: duplicate id"),
    (['id,label', 'ID0,z'], r"labels.csv:2: label 'z' is not one of"),
    (['id,label', 'zz,a'], r"labels.csv:2: unknown id 'zz'"),
])
def test_import_labels_bad_csv(tmp_path, lines, match):
  ids = [it['id'] for it in with_ids(PAIRS)]
  path = write(tmp_path / 'labels.csv', [line.replace('ID0', ids[0]) for line in lines])
  with pytest.raises(ValueError, match=match.replace('ID0', ids[0])):
    import_labels(path, PAIRS)
