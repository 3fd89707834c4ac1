"""Small codec configs for tests (kept tiny so compiles stay short)."""
from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from musicjax.codec.task import default_config
from musicjax.config import for_task


def rvq_config(**overrides) -> ml_collections.ConfigDict:
  q = default_config().model.rvq
  q.num_codebooks = 4
  q.codebook_size = 16
  q.codebook_dim = 4
  q.quantizer_dropout = 0.0
  q.dead_code_threshold = 0.0
  for k, v in overrides.items():
    q[k] = v
  return q


def small_config() -> ml_collections.ConfigDict:
  """A full codec config small enough to compile a train step in seconds."""
  c = for_task('codec')
  c.data.sample_rate = 8000
  c.data.segment_seconds = 0.128     # 1024 samples
  c.data.batch_size = 2
  m = c.model
  m.encoder_dim = 4
  m.decoder_dim = 16
  m.latent_dim = 8
  m.strides = (4, 4)
  m.dilations = (1, 3)
  m.rvq.num_codebooks = 3
  m.rvq.codebook_size = 32
  m.rvq.codebook_dim = 4
  m.rvq.kmeans_iters = 3
  d = c.disc
  d.periods = (2,)
  d.period_channels = (4, 8)
  d.stft_fft_sizes = (128,)
  d.stft_bands = (0.0, 0.5, 1.0)
  d.stft_channels = 4
  d.stft_layers = 2
  c.loss.mel_windows = (64, 256)
  c.loss.mel_bins = (10, 20)
  c.optim.g_lr = 1e-3
  c.optim.d_lr = 1e-3
  return c


def make(fn):
  """Builds modules the way the trainer does: without eager sharding."""
  with nnx.use_eager_sharding(False):
    return fn()


def tone_mix(seconds: float, sample_rate: int, batch: int = 1,
             freqs=(220.0, 330.0, 440.0, 660.0)) -> np.ndarray:
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  wave = sum(np.sin(2 * np.pi * f * t + i) / (i + 1) for i, f in enumerate(freqs))
  wave = 0.5 * wave / np.max(np.abs(wave))
  return np.tile(wave[None, :, None], (batch, 1, 1)).astype(np.float32)


def folder_run_config(data_path: str, eval_fraction: float = 0.25):
  """small_config() training on a folder, with the quickest compile: one item
  per forced CPU device, one mel scale, no discriminator, 2 steps, no eval."""
  c = small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', data_path, eval_fraction
  c.data.batch_size = c.data.eval_batch_size = 8
  c.loss.mel_windows, c.loss.mel_bins = (64,), (10,)
  c.loss.adv_start_step = 1000
  c.train.steps, c.train.checkpoint_every = 2, 2
  c.train.log_every, c.train.eval_every, c.train.eval_steps = 1, 1000, 1
  return c



def untrained_run(config, workdir: str) -> None:
  """A codec workdir (config.json + a checkpoint at step 1) of the freshly
  initialised codec of `config`: what `musicjax prepare` and the token models'
  summaries read from a trained one, without compiling a train step."""
  import jax
  from musicjax import config as config_lib
  from musicjax.train import checkpoint as ckpt_lib
  from musicjax.train import trainer
  config.model.rvq.kmeans_init = False   # usable codebooks without a first batch
  config_lib.save(config, workdir)
  s = trainer.setup(config)
  manager = ckpt_lib.make_manager(workdir, 1, False)
  try:
    with jax.set_mesh(s.mesh):
      ckpt_lib.save(manager, 1, trainer.init_state(s), None, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
