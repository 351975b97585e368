import json

import numpy as np

from train import metrics


def test_flatten_names_per_layer_and_expert_values():
  out = metrics.flatten({'loss': np.float32(2.5), 'moe_dropped': np.array([0.0, 0.25]),
                         'moe_load': np.array([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]])})
  assert out['loss'] == 2.5
  assert out['moe_dropped/layer1'] == 0.25
  assert out['moe_load/layer0/expert0'] == 0.5
  assert out['moe_load_max_over_min/layer0'] == 2.0
  assert out['moe_load_max_over_min/layer1'] == 2.0
  assert all(isinstance(v, float) for v in out.values())


def test_writer_appends_jsonl(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(3, {'loss': 1.5})
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows[0]['step'] == 3 and rows[0]['loss'] == 1.5


def test_progress_line_shows_moe_balance():
  m = {'loss': 1.0, 'lr': 1e-3, 'tokens_per_s': 100.0, 'mfu': 0.1, 'moe_aux_loss': 0.02,
       'moe_load_max_over_min/layer0': 1.5, 'moe_load_max_over_min/layer1': 3.0}
  line = metrics.progress_line(5, 10, m, 12.0)
  assert 'load max/min 3.00' in line and 'aux 0.0200' in line
