"""12.5 Hz codec in the HeartMuLa setting: 8 codebooks x 8192 (1.3 kbps).

48 kHz stereo, hop 3840 (strides 4*4*5*6*8), paper-scale channels. For
accelerators: the encoder input dim shards over the mesh 'fsdp' axis and the
output over 'tensor' (config.sharding.rules). Not trained in tests.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('codec')
  c.data.sample_rate = 48000
  c.data.channels = 2
  c.data.segment_seconds = 1.2       # 57600 samples = 15 frames
  c.data.batch_size = 64
  c.data.eval_batch_size = 16
  m = c.model
  m.encoder_dim = 64
  m.decoder_dim = 1536
  m.latent_dim = 1024
  m.strides = (4, 4, 5, 6, 8)   # hop 3840
  m.dilations = (1, 3, 9)
  m.rvq.num_codebooks = 8
  m.rvq.codebook_size = 8192
  m.rvq.codebook_dim = 16
  m.rvq.codebook_type = 'ema'
  m.rvq.kmeans_iters = 50
  m.rvq.dead_code_threshold = 0.5
  d = c.disc
  d.periods = (2, 3, 5, 7, 11)
  d.period_channels = (32, 128, 512, 1024, 1024)
  d.stft_fft_sizes = (2048, 1024, 512)
  d.stft_channels = 32
  c.loss.mel_windows = (32, 64, 128, 256, 512, 1024, 2048, 4096)
  c.loss.mel_bins = (5, 10, 20, 40, 80, 160, 320, 640)
  c.train.steps = 400000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000
  return c
