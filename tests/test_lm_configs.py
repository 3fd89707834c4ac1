"""The paper-scale LM config: its size, and that its sharding layouts compile
for the target topologies (simulated with CPU devices; nothing is allocated)."""
import os
import subprocess
import sys

import jax
from flax import nnx

from musicjax import config as cfg
from musicjax.bench import lm as lm_bench
from musicjax.lm import generate as gen
from musicjax.lm import task as task_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'lm', 'heartmula_3b.py')
OSS = os.path.join(REPO, 'configs', 'lm', 'heartmula_oss_3b.py')


def test_heartmula_3b_has_paper_scale():
  c = cfg.load(CONFIG)
  task = task_lib.LMTask(c)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: task.create_state(nnx.Rngs(0)))
  params = nnx.state(abstract.model, nnx.Param)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  total = count(params)
  backbone = count(nnx.state(abstract.model.backbone, nnx.Param))
  local = count(nnx.state(abstract.model.local, nnx.Param))
  # Seed 001 §3.3.3: a 3B global backbone; our local stack is 3 layers at width 3072.
  assert 2.8e9 < backbone < 3.3e9, backbone
  assert 0.3e9 < local < 0.5e9, local
  assert total < 4.0e9, total


def _compile_for_8_gpus(path: str) -> dict:
  """The train step of the config at `path` in the 8 x H100 layout (fsdp 4 x
  tensor 2) on the 8 forced CPU devices, with a shorter window so the compile
  stays quick (the layout is the same)."""
  return lm_bench.compile_train_step(cfg.load(path, [
      '--config.mesh.fsdp=4', '--config.mesh.tensor=2',
      '--config.data.batch_size=8', '--config.data.eval_batch_size=8',
      '--config.data.max_frames=100', '--config.data.max_text_tokens=32']))


def test_heartmula_3b_compiles_for_8_gpus():
  """The 8 x H100 layout (fsdp 4 x tensor 2) on the 8 forced CPU devices,
  with a shorter window so the compile stays quick (the layout is the same)."""
  out = _compile_for_8_gpus(CONFIG)
  assert out['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 2}
  # Parameters + AdamW moments of 3.75B params over 8 devices: ~5.3 GiB each.
  assert 4.0 < out['compiled_argument_gib'] < 7.0, out


def test_released_heartmula_3b_compiles_for_8_gpus():
  """The released model's config (heartlib's 3.94B parameters: 8197-wide
  heads, Llama-3 rotary scaling, the unconditional row) compiles its
  fine-tuning step on 8 simulated devices (fsdp 4 x tensor 2)."""
  out = _compile_for_8_gpus(OSS)
  assert out['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 2}
  # float32 parameters + AdamW moments of 3.94B over 8 devices: 5.5 GiB each.
  assert 4.5 < out['compiled_argument_gib'] < 7.0, out


def test_heartmula_3b_lowers_for_tpu_v5p_64():
  """The default layout (fsdp 16 x tensor 4) lowers on 64 simulated devices."""
  code = (
      'import jax; jax.config.update("jax_num_cpu_devices", 64)\n'
      'from musicjax import config as cfg\n'
      'from musicjax.parallel import rules\n'
      'from musicjax.train import trainer\n'
      f'c = cfg.load({CONFIG!r}, ["--config.data.max_frames=100",'
      ' "--config.data.max_text_tokens=32"])\n'
      's = trainer.setup(c)\n'
      'print("mesh", dict(s.mesh.shape))\n'
      'd = rules.describe(s.state_shardings)\n'
      'print("mlp", d["model/backbone/layers/mlp/gate"])\n')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True,
                     text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "mesh {'data': 1, 'fsdp': 16, 'tensor': 4}" in r.stdout
  # Stacked MLP weights: layers unsharded, embed over fsdp, mlp over tensor.
  assert "P(None, 'fsdp', 'tensor')" in r.stdout, r.stdout


def test_top_k_keeps_ties_by_default_and_the_key_passes_through():
  c = cfg.load(CONFIG)
  assert c.sample.top_k_keep_ties                # heartlib's top-k
  assert gen.sampling_from_config(c.sample).top_k_keep_ties
  c.sample.top_k_keep_ties = False
  assert not gen.sampling_from_config(c.sample).top_k_keep_ties


def test_musicgen_small_is_what_import_musicgen_builds():
  """configs/lm/musicgen_small.py = the config import-musicgen reads from
  musicgen-small's config.json (its decoder and T5-base numbers), and its
  size is the release's: the paper's "300M" decoder (420M counted with its
  cross-attention, tables and heads) beside T5-base (110M)."""
  from musicjax.export.released import musicgen
  transformers = __import__('pytest').importorskip('transformers')
  d = {'decoder': transformers.MusicgenDecoderConfig(
           vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24,
           ffn_dim=4096, num_attention_heads=16, hidden_size=1024,
           num_codebooks=4).to_dict(),
       'text_encoder': transformers.T5Config(
           vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
           num_heads=12).to_dict()}
  c = cfg.load(os.path.join(REPO, 'configs', 'lm', 'musicgen_small.py'))
  assert musicgen.config_from(d).model.to_dict() == c.model.to_dict()
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: task_lib.LMState(c, nnx.Rngs(0)).model)
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  decoder = count(abstract) - count(abstract.text_encoder)
  assert 0.40e9 < decoder < 0.44e9, decoder
  assert 0.10e9 < count(abstract.text_encoder) < 0.12e9
