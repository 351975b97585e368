"""SFT against the references users trust: TRL's completion-only SFT loss on the same model and
batch, and `transformers`' apply_chat_template token ids for locally built templates."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from launch import convert  # noqa: E402
from tests.launch.test_convert import _hf_dir  # noqa: E402


@pytest.mark.slow
def test_sft_loss_equals_trls_completion_only_loss(tmp_path, monkeypatch):
  trl = pytest.importorskip('trl')
  datasets = pytest.importorskip('datasets')
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(src)
  ds = datasets.Dataset.from_list([{'prompt': f'def f{i}(x):',
                                    'completion': '\n    return x' + f' * {i}' * (i % 3 + 1)}
                                   for i in range(6)])
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  args = trl.SFTConfig(output_dir=str(tmp_path / 'out'), completion_only_loss=True, report_to=[],
                       per_device_train_batch_size=6, max_length=64, use_cpu=True,
                       packing=False)
  trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
  with torch.no_grad():
    want = float(trainer.compute_loss(model, batch))
  # The same batch through palmax's SFT objective on the converted weights.
  import jax.numpy as jnp
  from flax import nnx
  from launch.workdir import load_model
  from train import objectives
  from train.step import ModelForward
  px = str(tmp_path / 'px')
  convert.run('hf', None, 'llama', src, px, log=lambda *_: None)
  _, _, graphdef, params, _ = load_model(px)
  ids, labels = batch['input_ids'].numpy(), batch['labels'].numpy()
  mask = batch['attention_mask'].numpy()
  b, t = ids.shape
  fields = {'tokens': jnp.asarray(np.concatenate([ids, np.zeros((b, 1), ids.dtype)], 1)),
            'segment_ids': jnp.asarray(mask, jnp.int32),
            'positions': jnp.asarray(np.broadcast_to(np.arange(t), (b, t)), jnp.int32)}
  # labels[t] is the target of position t - 1: palmax's loss_mask[t] weighs target tokens[t + 1].
  fields['loss_mask'] = jnp.asarray(np.concatenate([(labels[:, 1:] != -100),
                                                    np.zeros((b, 1), bool)], 1), jnp.float32)
  assert int(fields['loss_mask'].sum()) == int((labels[:, 1:] != -100).sum()) > 20
  objective = objectives.get('sft')(None, z_loss=0.0)
  got, _ = objective.loss(ModelForward(nnx.merge(graphdef, params)), fields)
  assert float(got) == pytest.approx(want, abs=1e-5)


def _chat_tokenizer(directory, template, bos='<|begin|>', eos='<|end|>'):
  """A BPE tokenizer.json with chat special tokens, and its tokenizer_config.json template."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  specials = [bos, eos, '<|pad|>', '<|im_start|>', '<|im_end|>', '<|eot|>']
  tk = Tokenizer(models.BPE(unk_token=None))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  text = ['You are helpful. What is 2 + 2? It is 4. Thanks! Bye now, see you.'] * 50
  bpe = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(text, bpe)
  os.makedirs(directory, exist_ok=True)
  tk.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': bos, 'eos_token': eos, 'pad_token': '<|pad|>',
               'chat_template': template, 'tokenizer_class': 'PreTrainedTokenizerFast'}, f)
  return str(directory)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + "
               "'<|im_end|>\n\n' + m['content'] | trim + '<|eot|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}"
               '{% endif %}')
MESSAGES = [{'role': 'system', 'content': 'You are helpful.'},
            {'role': 'user', 'content': 'What is 2 + 2?'},
            {'role': 'assistant', 'content': 'It is 4.'},
            {'role': 'user', 'content': 'Thanks!'},
            {'role': 'assistant', 'content': 'Bye now, see you.'}]


@pytest.mark.parametrize('template', [CHATML, LLAMA3_LIKE], ids=['chatml', 'llama3_like'])
def test_chat_ids_equal_apply_chat_template(tmp_path, template):
  pytest.importorskip('tokenizers')
  from train.hf_tokenizer import HFTokenizer
  from train.sft_data import chat_format
  directory = _chat_tokenizer(tmp_path / 'tok', template)
  ref = transformers.AutoTokenizer.from_pretrained(directory)
  tok = HFTokenizer(directory)
  chat = chat_format(tok, directory)
  segs = chat.segments(MESSAGES)
  want = list(ref.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)['input_ids'])
  assert [t for s, _ in segs for t in s] == want
  prompt = list(ref.apply_chat_template(MESSAGES[:2], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)['input_ids'])
  assert chat.prompt_ids(MESSAGES[:2]) == prompt
  trained = [ref.decode(s) for s, w in segs if w]
  assert len(trained) == 2
  assert trained[0].startswith('It is 4.') and trained[1].startswith('Bye now, see you.')
  # Everything before an assistant turn (its header included) is context, never trained.
  assert want[:len(prompt)] == [t for s, _ in segs[:1] for t in s]
