"""Continue training a workdir's model (e.g. one converted from Hugging Face) on new data.

The argument after the colon is the source workdir. Its model section and tokenizer are taken as
they are; its latest checkpoint's parameters initialise the run (config.train.init_from), with a
fresh optimizer and step 0. Data and schedule come from configs/base.py with fine-tuning defaults
below; override them as usual:

  python -m launch.convert --from=hf --family=llama --src=llama-hf --dst=runs/llama
  python -m launch.main --config=configs/finetune.py:runs/llama --workdir=runs/llama_ft \
      --config.data.source=text --config.data.paths='("notes/*.txt",)' --config.train.steps=200
"""
import json

from configs.base import get_base
from train import paths


def get_config(workdir: str = ''):
  if not workdir:
    raise ValueError('configs/finetune.py needs the source workdir: '
                     '--config=configs/finetune.py:WORKDIR')
  path = paths.join(workdir, 'config.json')
  if not paths.isfile(path):
    raise ValueError(f'{path} not found: the argument of configs/finetune.py must be a palmax '
                     'workdir (a training run, or the --dst of launch.convert --from=hf)')
  src = json.loads(paths.read_bytes(path))
  cfg = get_base()
  cfg.model.update(src['model'])   # In place: data.tokenizer.vocab_size follows model.vocab_size.
  cfg.data.tokenizer.path = _tokenizer_path(workdir)
  cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
  cfg.sample.update(src.get('sample', {}))
  cfg.train.update(steps=200, lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_every=100,
                   checkpoint_every=100, init_from=paths.absolute(workdir))
  return cfg


def _tokenizer_path(workdir: str) -> str:
  """The workdir's tokenizer as a data.tokenizer.path: a converted checkpoint's HF tokenizer
  directory, or palmax's tokenizer.model."""
  meta_path = paths.join(workdir, 'tokenizer.json')
  meta = {}
  if paths.isfile(meta_path):
    meta = json.loads(paths.read_bytes(meta_path))
  if meta.get('kind') == 'hf':
    return paths.absolute(paths.join(workdir, meta.get('dir', 'hf_tokenizer')))
  return paths.absolute(paths.join(workdir, 'tokenizer.model'))
