"""HeartCodec-oss decode path: the released 12.5 Hz codec's flow-matching
decoder and scalar-quantized waveform decoder (HeartMuLa's codec), 48 kHz
stereo from 8 x 8192 codes.

Codes -> 25 Hz, 256-channel latent by a 24 + 6 layer transformer (10 Euler
steps, guidance 1.25) in 29.76 s windows every 25.6 s -> waveform. Model
numbers are heartlib's config.json; window, steps and guidance its
`detokenize` defaults. Load weights with
musicjax.export.released.heartcodec.load(folder). Not a training
config (no `task`): read it with musicjax.codec.heartcodec.config.load.
"""
from musicjax.codec.heartcodec.config import default_config


def get_config():
  c = default_config()
  c.sample_rate = 48000
  c.code_rate_hz = 12.5
  q = c.codes
  q.num_quantizers = 8
  q.codebook_size = 8192
  q.codebook_dim = 32
  q.dim = 512
  e = c.estimator
  e.in_channels = 1024
  e.out_channels = 256
  e.num_heads = 24
  e.head_dim = 64
  e.num_layers = 24
  e.num_layers_2 = 6
  e.mlp_dim = 4096
  e.mlp_dim_2 = 8192
  e.proj_kernel = 3
  e.norm_eps = 1e-6
  e.rope_theta = 10000.0
  e.timestep_dim = 512
  e.timestep_max_period = 10000.0
  e.timestep_scale = 1000.0
  e.dtype = 'float32'
  f = c.flow
  f.frames_per_code = 2
  f.num_steps = 10
  f.guidance_scale = 1.25
  f.sigma_min = 1e-6
  f.window_codes = 372
  f.hop_codes = 320
  s = c.scalar
  s.channels = 2
  s.latent_dim = 128
  s.levels = 9.0
  s.init_channel = 64
  s.upsample_factors = (5, 4, 4, 4, 3)
  s.upsample_kernel_sizes = (10, 8, 8, 8, 6)
  s.res_dilations = (1, 3, 5, 7, 9)
  s.res_kernel_size = 7
  s.delay_kernel_size = 5
  s.kernel_size = 7
  s.num_samples = 2
  s.num_bands = 1
  s.causal = True
  return c
