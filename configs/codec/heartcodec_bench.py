"""HeartCodec's decode path at a size that runs on 2 CPU cores, for
`musicjax bench heartcodec-decode` and heartlib's side by side (the
maintainers' peer timing script builds heartlib's HeartCodec from these
numbers).

The released structure (heartcodec_oss.py), narrower: an estimator of 4
heads x 64 = width 256 (released 24 x 64) and 2 + 1 layers (released
24 + 6), SwiGLU widths as heartlib derives them from the width; and the
48 kHz stereo waveform decoder with 16 channels after its last upsampling
(released 64: its convs cost 16x less; the released one alone takes ~20 s a
window on 2 cores). Codebooks, windows (29.76 s every 25.6 s), 10 Euler steps
with guidance 1.25, upsampling (5, 4, 4, 4, 3) and 48 kHz are the released
ones, so every window runs the released program's steps at these widths.
"""
from musicjax.codec.heartcodec.config import default_config, heartlib_mlp_dim

HEADS = 4
HEAD_DIM = 64
WAVE_CHANNELS = 16


def get_config():
  c = default_config()              # every other number: the released model
  e = c.estimator
  e.num_heads = HEADS
  e.head_dim = HEAD_DIM
  e.num_layers = 2
  e.num_layers_2 = 1
  e.mlp_dim = heartlib_mlp_dim(HEADS * HEAD_DIM)
  e.mlp_dim_2 = heartlib_mlp_dim(2 * HEADS * HEAD_DIM)
  c.scalar.init_channel = WAVE_CHANNELS
  return c
