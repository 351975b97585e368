"""launch.convert: HF checkpoint directories <-> palmax workdirs, for every family.

Tiny random models are built with transformers (no download) and saved with `save_pretrained`,
sharded; conversion must round-trip bit for bit, give a workdir that samples and trains, and
refuse bad input with a message naming the tensor while leaving --dst untouched.
"""
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
import sentencepiece as spm  # noqa: E402
from flax import nnx  # noqa: E402

from launch import convert, workdir as workdir_lib  # noqa: E402
from launch.hf_files import HFCheckpoint  # noqa: E402
from tests.conftest import write_code_corpus  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, num_hidden_layers=2, rms_norm_eps=1e-6,
              initializer_range=0.2)
FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(**COMMON),
    'mistral': lambda: transformers.MistralConfig(sliding_window=4, **COMMON),
    'mixtral': lambda: transformers.MixtralConfig(sliding_window=4, num_local_experts=4,
                                                  num_experts_per_tok=2, **COMMON),
    'gemma': lambda: transformers.GemmaConfig(**COMMON),
    'gemma2': lambda: transformers.Gemma2Config(sliding_window=4, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0, **COMMON),
    'gemma3': lambda: transformers.Gemma3TextConfig(
        sliding_window=4, layer_types=['sliding_attention', 'full_attention'], **COMMON),
}
TEXT = '\n'.join(f'def f{i}(x):\n    return x * {i} + {i % 7}' for i in range(200))


def _spm_tokenizer(directory, vocab=80):
  """A Llama-layout SentencePiece model (unk 0, bos 1, eos 2, no pad), trained in a second."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split('\n')), model_writer=buf,
                                 vocab_size=vocab, model_type='bpe', unk_id=0, bos_id=1, eos_id=2,
                                 pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(buf.getvalue())


def _hf_dir(path, family, dtype=torch.bfloat16, tokenizer=True, **save):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
  with torch.no_grad():   # Norm gains away from their init, so a misplaced norm shows.
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn(p.shape))
  model.to(dtype).save_pretrained(path, max_shard_size=save.pop('max_shard_size', '16KB'), **save)
  if tokenizer:
    _spm_tokenizer(path)
  return str(path)


def _assert_same_tensors(a_dir, b_dir):
  a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
  assert sorted(a.names()) == sorted(b.names())
  for n in a.names():
    x, y = a.rows(n), b.rows(n)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), n
    assert x.tobytes() == y.tobytes(), n


@pytest.mark.parametrize('family', list(FAMILIES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, family):
  src = _hf_dir(tmp_path / 'hf', family)
  index = json.load(open(os.path.join(src, 'model.safetensors.index.json')))
  assert len(set(index['weight_map'].values())) > 1   # Sharded.
  convert.run('hf', None, family, src, str(tmp_path / 'px'), log=lambda *_: None)
  convert.run(None, 'hf', family, str(tmp_path / 'px'), str(tmp_path / 'back'),
              max_shard_size='12KB', log=lambda *_: None)
  _assert_same_tensors(src, str(tmp_path / 'back'))
  assert os.path.isfile(tmp_path / 'back' / 'tokenizer.model')
  assert json.load(open(tmp_path / 'back' / 'config.json')) == json.load(open(f'{src}/config.json'))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'back')).eval()
  orig = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
  toks = torch.randint(3, 96, (1, 9))
  with torch.no_grad():
    assert torch.equal(orig(toks).logits, back(toks).logits)
  # As if trained in palmax (no carried HF config or dtypes): config.json comes from
  # model.hf.config_to_hf and tensors are float32; transformers must build the same model.
  shutil.rmtree(tmp_path / 'px' / 'hf')
  convert.run(None, 'hf', family, str(tmp_path / 'px'), str(tmp_path / 'native'),
              log=lambda *_: None)
  native = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'native')).eval()
  orig32 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  assert native.dtype == torch.float32
  with torch.no_grad():
    assert torch.equal(orig32(toks).logits, native(toks).logits)


def test_export_dtype_auto_is_exact_and_an_explicit_dtype_rounds():
  import ml_dtypes
  from launch.convert_export import make_cast
  cast, target = make_cast('auto', {'w': 'bfloat16'}, np.dtype(np.float32))
  assert cast('w', np.array([1.0, 1.5], np.float32)).dtype == ml_dtypes.bfloat16
  assert target('v') == np.float32   # Not recorded at import: the checkpoint's dtype.
  with pytest.raises(ValueError, match=r"'w'.*do not fit bfloat16.*--dtype=bfloat16 to round"):
    cast('w', np.array([1.0 + 2**-10], np.float32))   # e.g. changed by training after import.
  cast, _ = make_cast('bfloat16', {}, np.dtype(np.float32))
  assert cast('w', np.array([1.0 + 2**-10], np.float32)) == 1.0


def _palmax_logits(workdir, tokens):
  _, _, graphdef, params, _ = workdir_lib.load_model(workdir)
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens))


@pytest.mark.parametrize('family', ['mixtral', 'gemma3'])
def test_converted_workdir_logits_match_hf(tmp_path, family):
  # float32 on both sides; HF loads the bf16 checkpoint upcast, as palmax's params are.
  src = _hf_dir(tmp_path / 'hf', family)
  convert.run('hf', None, family, src, str(tmp_path / 'px'), log=lambda *_: None)
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                            attn_implementation='eager').eval()
  tokens = np.random.default_rng(0).integers(3, 96, (2, 11))
  with torch.no_grad():
    want = model(torch.as_tensor(tokens)).logits.numpy()
  got = _palmax_logits(str(tmp_path / 'px'), jnp.asarray(tokens, jnp.int32))
  err = float(np.max(np.abs(got - want)))
  print(f'\n[convert parity] {family}: max|dlogits| {err:.2e}')
  assert err < 1e-4


def test_pytorch_bin_shards_and_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32, tokenizer=False)
  _to_bin_shards(src)
  # A BPE tokenizer.json (Llama 3 ships only this) with special tokens named in its config.
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  tk.train_from_iterator(TEXT.split('\n'), tokenizers.trainers.BpeTrainer(
      vocab_size=90, special_tokens=['<unk>', '<|begin|>', '<|end|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tk.save(os.path.join(src, 'tokenizer.json'))
  with open(os.path.join(src, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<|begin|>', 'eos_token': '<|end|>'}, f)
  convert.run('hf', None, 'llama', src, str(tmp_path / 'px'), log=lambda *_: None)
  _, _, _, params, tok = workdir_lib.load_model(str(tmp_path / 'px'))
  assert tok.kind == 'tokenizer.json' and (tok.bos_id, tok.eos_id) == (1, 2)
  text = 'def f3(x):\n    return x'
  assert tok.decode(tok.encode(text)) == text and tok.encode(text) == tk.encode(text).ids
  sd = torch.load(os.path.join(src, 'pytorch_model-00001-of-00002.bin'), weights_only=True) | \
      torch.load(os.path.join(src, 'pytorch_model-00002-of-00002.bin'), weights_only=True)
  q0 = sd['model.layers.0.self_attn.q_proj.weight'].numpy()
  np.testing.assert_array_equal(np.asarray(params['stack0']['block0']['attn']['w_q'][0]),
                                q0.reshape(4, 8, 32).transpose(2, 0, 1))
  convert.run(None, 'hf', 'llama', str(tmp_path / 'px'), str(tmp_path / 'back'),
              log=lambda *_: None)
  _assert_same_tensors(src, str(tmp_path / 'back'))   # .bin in, safetensors out, same bytes.
  assert os.path.isfile(tmp_path / 'back' / 'tokenizer.json')


def test_tokenizer_copied_in_after_converting_without_one_samples(tmp_path):
  # Issue 10, failure 7: the note said to copy a tokenizer into PX/hf_tokenizer, but sampling
  # then looked for PX/tokenizer.model (the kind marker was written only with a tokenizer).
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32, tokenizer=False)
  px = str(tmp_path / 'px')
  notes = []
  convert.run('hf', None, 'llama', src, px, log=notes.append)
  hint = next(n for n in notes if 'copy one into' in n)
  with pytest.raises(ValueError, match='hf_tokenizer'):
    workdir_lib.load_model(px)
  os.makedirs(hint.split('copy one into ')[1].split(' to sample')[0])
  _spm_tokenizer(os.path.join(px, 'hf_tokenizer'))   # Exactly what the note asks for.
  out = workdir_lib.sample_workdir(px, prompt='def f1(x):', max_new_tokens=4, num_samples=1,
                                   temperature=0.0, top_k=0, top_p=1.0, seed=0)
  assert out[0].startswith('def f1(x):')
  tok = workdir_lib.load_model(px)[4]
  assert (tok.bos_id, tok.eos_id) == (1, 2)


def _run(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_converted_workdir_samples_and_trains_with_the_unchanged_commands(tmp_path):
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  dst, new = str(tmp_path / 'px'), str(tmp_path / 'ft')
  convert.run('hf', None, 'llama', src, dst, log=lambda *_: None)
  # What `python -m launch.sample --workdir=DST` runs (its CLI is tested in test_main.py).
  out = workdir_lib.sample_workdir(dst, prompt='def f1', max_new_tokens=5, num_samples=2,
                                   temperature=0.0, top_k=0, top_p=1.0, seed=0)
  assert out[0].startswith('def f1') and out[0] == out[1]   # Greedy: both samples agree.
  # Continued training from the converted weights, its tokenizer, a fresh optimizer. With lr 0
  # the trained parameters must be exactly the converted ones: training started from them.
  glob = write_code_corpus(tmp_path / 'corpus', n_docs=12)
  r = _run(['launch.main', f'--config=configs/finetune.py:{dst}', f'--workdir={new}',
            '--config.data.source=text', f"--config.data.paths=('{glob}',)",
            '--config.data.seq_len=32', '--config.train.steps=2', '--config.train.warmup_steps=1',
            '--config.train.lr=0.0',
            '--config.train.batch_size=2', '--config.train.eval_every=2',
            '--config.train.eval_batches=1', '--config.train.peak_flops=1e11',
            '--config.train.tensorboard=False', '--config.sample.max_new_tokens=4',
            '--config.sample.num_samples=1'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Initialised parameters from' in r.stdout and '--- 1 samples from step 2' in r.stdout
  _, _, _, trained, tok = workdir_lib.load_model(new)
  _, _, _, converted, _ = workdir_lib.load_model(dst)
  assert tok.kind == 'sentencepiece' and tok.eos_id == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               trained, converted)


def _to_bin_shards(directory):
  """Rewrites a safetensors checkpoint as two pytorch_model-*.bin shards with their index (the
  pre-safetensors layout; transformers 5 no longer writes it)."""
  ckpt = HFCheckpoint(directory)
  names = ckpt.names()
  shards = {f'pytorch_model-0000{k + 1}-of-00002.bin': names[k::2] for k in range(2)}
  for file, part in shards.items():
    torch.save({n: torch.from_numpy(ckpt.rows(n)) for n in part}, os.path.join(directory, file))
  with open(os.path.join(directory, 'pytorch_model.bin.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': {n: f for f, p in shards.items() for n in p}}, f)
  for f in os.listdir(directory):
    if 'safetensors' in f:
      os.remove(os.path.join(directory, f))


# ---- Bad input: a clear error naming the problem, --dst untouched --------------------------------

@pytest.fixture(scope='module')
def llama_f32(tmp_path_factory):
  return _hf_dir(tmp_path_factory.mktemp('llama') / 'hf', 'llama', dtype=torch.float32,
                 max_shard_size='10MB')


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite(path, drop=None, change=None):
  """Rewrites a safetensors file without tensor `drop`, or with change=(name, new array)."""
  from safetensors.numpy import load_file, save_file
  t = load_file(path)
  if drop:
    del t[drop]
  if change:
    t[change[0]] = change[1]
  save_file(t, path, metadata={'format': 'pt'})


def _refused(tmp_path, match, *args, **kw):
  dst = tmp_path / 'dst'
  with pytest.raises(ValueError, match=match):
    convert.run(*args, str(dst), log=lambda *_: None, **kw)
  assert not dst.exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-convert-' in p]  # No half-written leftovers.


def test_unknown_or_mismatched_family(tmp_path, llama_f32):
  _refused(tmp_path, r"--family='gpt2' is not supported", 'hf', None, 'gpt2', llama_f32)
  _refused(tmp_path, r'--family=gemma but .* is a llama checkpoint', 'hf', None, 'gemma', llama_f32)


def test_missing_tensor_is_named(tmp_path, llama_f32):
  src = _copy(llama_f32, tmp_path / 'hf')
  _rewrite(os.path.join(src, 'model.safetensors'), drop='model.layers.1.mlp.up_proj.weight')
  _refused(tmp_path, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'", 'hf', None,
           'llama', src)


def test_shape_disagreeing_with_config_is_named(tmp_path, llama_f32):
  src = _copy(llama_f32, tmp_path / 'hf')
  cfg = json.load(open(os.path.join(src, 'config.json')))
  cfg['intermediate_size'] = 40
  json.dump(cfg, open(os.path.join(src, 'config.json'), 'w'))
  _refused(tmp_path, r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(48, 32\), "
           r'expected \(40, 32\)', 'hf', None, 'llama', src)


def test_dtype_the_target_cannot_hold(tmp_path, llama_f32):
  src = _copy(llama_f32, tmp_path / 'hf')
  # Quantized-looking int8 weights: refused from the header, before anything is written.
  _rewrite(os.path.join(src, 'model.safetensors'),
           change=('model.layers.0.self_attn.v_proj.weight', np.ones((16, 32), np.int8)))
  _refused(tmp_path, r"'model\.layers\.0\.self_attn\.v_proj\.weight' has dtype int8", 'hf', None,
           'llama', src)
  # float32 weights into bfloat16 parameters: found while writing (leaves are written
  # concurrently, so any of them may be the one named); nothing is left behind.
  _refused(tmp_path, r"tensor 'model\.[\w.]+' \(float32\) has values bfloat16 cannot hold",
           'hf', None, 'llama', llama_f32, param_dtype='bfloat16')
  # Export: float16 cannot hold 1e6.
  src = _copy(llama_f32, tmp_path / 'big')
  w = np.full((32,), 1e6, np.float32)
  _rewrite(os.path.join(src, 'model.safetensors'), change=('model.norm.weight', w))
  convert.run('hf', None, 'llama', src, str(tmp_path / 'px'), log=lambda *_: None)
  _refused(tmp_path, r"'model\.norm\.weight' has values beyond the range of float16", None, 'hf',
           'llama', str(tmp_path / 'px'), dtype='float16')


def test_existing_dst_and_cli_errors_are_one_line(tmp_path, llama_f32):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('keep')
  with pytest.raises(ValueError, match='already exists and is not empty'):
    convert.run('hf', None, 'llama', llama_f32, str(tmp_path / 'full'))
  assert (tmp_path / 'full' / 'x').read_text() == 'keep'
  r = subprocess.run([sys.executable, '-m', 'launch.convert', '--from=hf', '--family=gpt2',
                      f'--src={llama_f32}', f'--dst={tmp_path / "d"}'], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines() == [
      "error: --family='gpt2' is not supported; expected one of ['gemma', 'gemma2', 'gemma3', "
      "'llama', 'mistral', 'mixtral']"]


def test_init_from_checks_the_architecture_not_the_run_time_fields(tmp_path, llama_f32):
  import dataclasses
  from model import hf, transformer
  from train import checkpoint_stream
  from train.checkpoint import CheckpointMismatchError
  px = str(tmp_path / 'px')
  convert.run('hf', None, 'llama', llama_f32, px, log=lambda *_: None)
  cfg = hf.config_from_hf(json.load(open(os.path.join(llama_f32, 'config.json'))))
  # Fine-tuning may change the compute dtype, remat and context length...
  run_cfg = dataclasses.replace(cfg, dtype='bfloat16', remat='full', max_seq_len=32)
  abstract = nnx.split(transformer.abstract(run_cfg))[1].to_pure_dict()
  params, step = checkpoint_stream.init_params(px, run_cfg, abstract)
  q = HFCheckpoint(llama_f32).rows('model.layers.1.self_attn.q_proj.weight')
  assert step == 0
  np.testing.assert_array_equal(np.asarray(params['stack0']['block0']['attn']['w_q'][1]),
                                q.reshape(4, 8, 32).transpose(2, 0, 1))
  # ...but not the architecture.
  with pytest.raises(CheckpointMismatchError, match=r'model\.mlp_dim=48, but this run has '
                     r'model\.mlp_dim=64'):
    checkpoint_stream.init_params(px, dataclasses.replace(cfg, mlp_dim=64), abstract)
