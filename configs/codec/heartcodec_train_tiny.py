"""Tiny trainable HeartCodec: learns on the chorales on 2 CPU cores in minutes.

12 kHz mono; 12.5 Hz codes of 4 codebooks x 32 (250 bit/s); a 32-channel
25 Hz latent rounded to steps of 1/9; a 2 + 1 layer estimator of width 32;
0.64 s segments, each one flow window of 8 codes. The decoder keys
(codes / estimator / flow / scalar) are HeartCodecDecoder's, so a trained
run decodes songs of any length with its windows (8 codes every 6).

Measured: see docs/codec.md ("Training HeartCodec's flow-matching decoder").
"""
from musicjax.config import for_task


def get_config():
  c = for_task('heartcodec')
  c.data.sample_rate = 12000
  c.data.channels = 1
  c.data.segment_seconds = 0.64      # 8 codes = 16 latent frames = 7680 samples
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.max_pieces = 40
  # Levels as rendered: the tiny run has no time to learn a 30 dB range.
  c.data.gain_augment_dbfs = ()

  m = c.model
  m.sample_rate = 12000              # 12.5 codes/s x 2 x (5*4*4*3) x 2 samples
  m.code_rate_hz = 12.5
  q = m.codes
  q.num_quantizers = 4
  q.codebook_size = 32
  q.codebook_dim = 8
  q.dim = 32
  e = m.estimator
  e.in_channels = 96                 # 2 x 32 latent channels + 32 code features
  e.out_channels = 32
  e.num_heads = 2
  e.head_dim = 16
  e.num_layers = 2
  e.num_layers_2 = 1
  e.mlp_dim = 64
  e.mlp_dim_2 = 128
  e.timestep_dim = 32
  # Shared by the estimator and the waveform decoder (HeartCodecDecoder):
  # with these 4..64-channel convs 0.02 leaves the decoder's output near
  # silent at init (measured std ~1e-4); 0.1 gives ~0.05.
  e.init_std = 0.1
  f = m.flow
  f.frames_per_code = 2
  f.num_steps = 10
  f.guidance_scale = 1.25
  f.window_codes = 8                 # = the training segment
  f.hop_codes = 6                    # 2 codes (4 latent frames) of known prefix
  s = m.scalar
  s.channels = 1
  # 32 x 25 Hz: with 16 the autoencoder sat at eval mel distance 2.37 for
  # 300 steps, ignoring its latent; 32 reached 2.11 and SI-SDR +1 dB.
  s.latent_dim = 32
  s.init_channel = 4                 # 64 channels at 25 Hz, halved per block
  s.upsample_factors = (5, 4, 4, 3)
  s.upsample_kernel_sizes = (10, 8, 8, 6)
  s.res_dilations = (1, 3)
  s.num_samples = 2
  en = m.encoder
  en.init_channel = 4                # doubles per block to 64 at 25 Hz
  en.res_dilations = (1, 3)
  # The latent's scale at init is a steep function of this (0.13 -> std
  # 0.02, all rounded to 0; 0.17 -> 0.26; 0.2 -> 0.7, tanh saturating).
  en.init_std = 0.17
  qz = m.quantizer
  qz.hidden_dim = 64
  qz.init_std = 0.1
  qz.dead_code_threshold = 0.05

  o = c.optim
  o.lr = 3e-3
  o.warmup_steps = 50
  o.lr_decay = 0.999

  lo = c.loss
  lo.mel_windows = (64, 256, 1024)
  lo.mel_bins = (16, 40, 80)
  lo.mel_weight = 1.0
  # Mel alone leaves the phase free; L1 on the waveform pins it (the RVQ
  # codec's tiny config needed it too).
  lo.wave_weight = 10.0
  lo.flow_weight = 1.0
  lo.commit_weight = 1.0
  lo.codebook_weight = 1.0

  c.train.steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_steps = 2
  c.train.checkpoint_every = 500
  c.train.eval_at_start = True       # the untrained baseline, logged at step 0
  return c
