"""A LoRA adapter trained by palmax's trainer leaves through launch.convert: unmerged in the PEFT
library's format (loaded by `peft` on the exported base) and merged into a HF checkpoint."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from launch import convert  # noqa: E402
from tests.launch.test_convert import _hf_dir  # noqa: E402

pytestmark = pytest.mark.slow


def test_trained_lora_exports_to_peft_and_merged_hf(tmp_path, sft_files):
  from flax import nnx
  from configs import sft_lora
  from launch.workdir import load_model
  from train import trainer
  quiet = lambda *_: None
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  px = str(tmp_path / 'px')
  convert.run('hf', None, 'llama', src, px, log=quiet)
  cfg = sft_lora.get_config(px)
  cfg.data.update(sft_task='', paths=(sft_files[0],), sft_val_paths=(sft_files[1],), seq_len=32)
  cfg.train.update(steps=3, batch_size=8, lr=3e-2, warmup_steps=1, eval_every=0, eval_batches=1,
                   checkpoint_every=3, eval_tasks='', peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.peft.update(lora_targets=r'(attn|mlp)/w_\w+', lora_rank=4, base_dtype='')   # float32.
  lora = str(tmp_path / 'lora')
  trainer.train(cfg, lora, log=quiet)
  convert.run(None, 'hf', 'llama', px, str(tmp_path / 'base_hf'), log=quiet)
  convert.run(None, 'peft', 'llama', lora, str(tmp_path / 'adapter'), log=quiet)
  convert.run(None, 'hf', 'llama', lora, str(tmp_path / 'merged_hf'), log=quiet)

  tokens = np.random.default_rng(0).integers(3, 96, (2, 13))
  _, _, graphdef, params, _ = load_model(lora)
  ours = np.asarray(nnx.merge(graphdef, params)(tokens)[0])

  def logits(model):
    with torch.no_grad():
      return model.eval()(torch.as_tensor(tokens)).logits.numpy()

  load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(
      d, dtype=torch.float32, attn_implementation='eager')
  base = logits(load(str(tmp_path / 'base_hf')))
  unmerged = logits(peft.PeftModel.from_pretrained(load(str(tmp_path / 'base_hf')),
                                                   str(tmp_path / 'adapter')))
  merged = logits(load(str(tmp_path / 'merged_hf')))
  assert np.abs(unmerged - base).max() > 1e-3        # The adapters were trained.
  np.testing.assert_allclose(unmerged, ours, atol=1e-4)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)


def test_peft_export_refuses_a_workdir_without_lora(tmp_path):
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  convert.run('hf', None, 'llama', src, str(tmp_path / 'px'), log=lambda *_: None)
  with pytest.raises(ValueError, match="exports LoRA adapters.*method=''"):
    convert.run(None, 'peft', 'llama', str(tmp_path / 'px'), str(tmp_path / 'a'),
                log=lambda *_: None)
  assert not (tmp_path / 'a').exists()
