"""Tiny codec: trains on the chorales on 2 CPU cores in minutes.

16 kHz mono, hop 256 (62.5 Hz), 4 codebooks x 256 (2 kbps), small channels,
half-second segments; the discriminators start after train.steps (see below).
"""
from musicjax.codec.task import default_config
from musicjax.config import base_config


def get_config():
  c = base_config()
  c.task = 'codec'
  for section, sub in default_config().items():
    c[section] = sub
  c.data.sample_rate = 16000
  c.data.segment_seconds = 0.512     # 8192 samples = 32 frames
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.max_pieces = 40

  m = c.model
  m.encoder_dim = 8
  m.decoder_dim = 64
  m.latent_dim = 32
  m.strides = (4, 8, 8)              # hop 256
  m.dilations = (1, 3)
  m.rvq.num_codebooks = 4
  m.rvq.codebook_size = 256
  m.rvq.kmeans_iters = 10
  m.rvq.dead_code_threshold = 0.02

  d = c.disc
  d.periods = (2, 3, 5)
  d.period_channels = (8, 16, 32)
  d.stft_fft_sizes = (512,)
  d.stft_channels = 8
  d.stft_layers = 3

  c.optim.g_lr = 1e-3
  c.optim.d_lr = 1e-3
  c.optim.lr_decay = 0.9995

  lo = c.loss
  lo.mel_windows = (64, 256, 1024)
  lo.mel_bins = (16, 40, 80)
  # The adversarial phase costs ~8x per step on this CPU (measured 0.5 vs 4
  # steps/s), so within the 10-minute budget tiny trains on reconstruction
  # and VQ losses only; raise train.steps to reach the GAN phase.
  lo.adv_start_step = 1500

  c.train.steps = 1500
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.eval_steps = 2
  c.train.checkpoint_every = 500
  return c
