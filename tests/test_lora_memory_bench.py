"""`bench lm-memory` on LoRA and QLoRA configs: the compiled train step's
per-device arguments (weights + optimizer state) shrink as the bench is told
to train adapters only, then to store the frozen base in int8."""
import json
import os

from musicjax import cli
from musicjax import config as config_lib
from musicjax.bench import lm as lm_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIG = os.path.join(REPO, 'configs', 'lm', 'tiny.py')
# Width 64 so the attention and MLP weights (what LoRA adapts and QLoRA
# quantizes) outweigh the embedding tables, as they do at scale.
TINY = [
    '--config.model.num_codebooks=2', '--config.model.codebook_size=16',
    '--config.model.text_vocab_size=16', '--config.model.backbone.dim=64',
    '--config.model.local.dim=64', '--config.model.backbone.mlp_dim=128',
    '--config.model.local.mlp_dim=128', '--config.model.backbone.num_layers=2',
    '--config.model.local.num_layers=1', '--config.data.max_frames=8',
    '--config.data.max_text_tokens=8', '--config.data.reference_frames=4',
    '--config.data.batch_size=8', '--config.data.eval_batch_size=8',
    '--config.model.backbone.remat=full']
LORA = ['--config.lora.rank=2', "--config.lora.targets=('*/attn/w?','*/mlp/*')"]


def _aot(overrides, param_dtype=None):
  out = lm_bench.run('lm-memory', config_lib.load(LM_CONFIG, TINY + overrides),
                     devices=8, param_dtype=param_dtype)
  assert isinstance(out['aot'], dict), out['aot']
  return out


def test_lora_then_qlora_shrink_the_compiled_state():
  full = _aot([])
  lora = _aot(LORA)
  int8 = _aot(LORA + ['--config.lora.base=int8'])
  int4 = _aot(LORA + ['--config.lora.base=int4', '--config.lora.int4_group=32'])
  arg = {k: v['aot']['compiled_argument_bytes'] for k, v in (
      ('full', full), ('lora', lora), ('int8', int8), ('int4', int4))}
  # The adapters are all LoRA trains: its moments and gradients are theirs.
  assert lora['trained_params'] < full['trained_params'] / 10
  assert full['trained_params'] == full['params']
  # Full fine-tuning keeps weights + 2 AdamW moments; LoRA the frozen
  # weights + the adapters' three copies; int8 stores those weights in a byte.
  assert arg['int4'] < arg['int8'] < arg['lora'] < arg['full']
  # int4 holds two values a byte and is unpacked a layer at a time: the
  # stacks are never widened whole (XLA:CPU did so with jnp.int4 arrays).
  temp = {k: v['aot']['compiled_temp_bytes'] for k, v in (('int8', int8),
                                                           ('int4', int4))}
  assert temp['int4'] <= temp['int8']
  assert arg['lora'] < 0.5 * arg['full']
  for out in (full, lora, int8):
    aot = out['aot']
    assert aot['compiled_total_bytes'] >= aot['compiled_argument_bytes'] > 0
    assert aot['compiled_temp_bytes'] > 0
    assert aot['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert lora['lora']['base'] == 'float' and int8['lora']['base'] == 'int8'
  assert full['lora'].startswith('off')


def test_bfloat16_state_halves_the_compiled_arguments():
  f32 = _aot([])['aot']
  bf16 = _aot([], param_dtype='bfloat16')['aot']
  assert bf16['param_dtype'] == 'bfloat16'
  # Every float leaf (weights, both moments) is half the bytes; the batch's
  # int32 tokens and the step counter are not.
  assert 0.45 < bf16['compiled_argument_bytes'] / f32['compiled_argument_bytes'] < 0.55


def test_cli_compiles_a_lora_config_without_a_base_run(capsys):
  # A LoRA run needs config.init.workdir; the compile-only bench loads
  # nothing, so it must not ask for one.
  assert cli.main(['bench', 'lm-memory', '--config', LM_CONFIG, '--devices', '8',
                   *TINY, *LORA, '--config.lora.base=int4',
                   '--config.lora.int4_group=32']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['lora']['base'] == 'int4' and out['lora']['int4_group'] == 32
  assert out['aot']['compiled_argument_bytes'] > 0
