"""A tiny HeartCodec decode path of the released structure: the random-init
model of tests/fixtures/heartcodec_tiny/ (its config.json), two estimator
stacks of 2 + 1 layers at width 8 / 16, a 3 x 16 codebook and a 2-block
waveform decoder at 300 Hz.

Windows are heartlib's smallest (7.44 s = 93 codes, hop 80); latents keep 256
channels, which heartlib's detokenize assumes.
"""
from musicjax.codec.heartcodec.config import default_config


def get_config():
  c = default_config()
  c.sample_rate = 300               # 12.5 codes/s x 2 x (3 * 2) x 2 samples
  c.code_rate_hz = 12.5
  q = c.codes
  q.num_quantizers = 3
  q.codebook_size = 16
  q.codebook_dim = 4
  q.dim = 8
  e = c.estimator
  e.in_channels = 520
  e.out_channels = 256
  e.num_heads = 2
  e.head_dim = 4
  e.num_layers = 2
  e.num_layers_2 = 1
  e.mlp_dim = 256                   # heartlib rounds SwiGLU widths up to 256
  e.mlp_dim_2 = 256
  f = c.flow
  f.num_steps = 10
  f.guidance_scale = 1.25
  f.window_codes = 93
  f.hop_codes = 80
  s = c.scalar
  s.latent_dim = 128
  s.init_channel = 4
  s.upsample_factors = (3, 2)
  s.upsample_kernel_sizes = (6, 4)
  s.res_dilations = (1, 3, 5, 7, 9)
  return c
