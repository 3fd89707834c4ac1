"""A codec of EnCodec 24 kHz's size and setting, for timing only.

It matches EnCodec 24 kHz (`encodec.EncodecModel.encodec_model_24khz`) in
what sets its speed, so `musicjax bench codec` sits beside EnCodec's own
code (docs/figures.md): 24 kHz mono, strides (2, 4, 5, 8)
(hop 320, 75 Hz), 8 codebooks x 1024 = 6 kbps, 14.85M generator parameters
(bench prints `params`), and about the same FLOPs per second of audio. It is
not meant to be trained as is (train configs/codec/base.py).

How the size is reached: EnCodec's SEANet widths (32 channels after the
stem, doubling to 512; one residual unit of kernel 3 per block; strided and
transposed convs of kernel 2 x stride) give 6.36M parameters here. EnCodec
adds two 2-layer LSTMs of width 512 at the 75 Hz bottleneck (about 8.4M
parameters); this model has no LSTM, so a wide latent (the 512 -> latent
projection and the latent -> 512 decoder stem, also at 75 Hz) stands in for
them: latent 1736 lands at 14.85M parameters and, by XLA's cost analysis,
3.1 / 3.6 GFLOP per second of audio for encode / decode, against about
2.7 + 0.6 (LSTM) for EnCodec's each way. Codes are looked up as in DAC
(factorized, 8-dim) with EMA codebooks as in EnCodec: the statistics are
buffers, not parameters, as EnCodec's are.
"""
from musicjax.config import for_task

# 14.85M generator parameters with the widths below (EnCodec 24 kHz: 14.85M).
LATENT_DIM = 1736


def get_config():
  c = for_task('codec')
  c.data.sample_rate = 24000
  c.data.channels = 1
  m = c.model
  m.encoder_dim = 32               # EnCodec n_filters: 32 -> 64 -> ... -> 512
  m.decoder_dim = 512              # and back: 512 -> ... -> 32
  m.strides = (2, 4, 5, 8)         # hop 320 -> 75 Hz
  m.dilations = (1,)               # EnCodec: one residual unit per block
  m.residual_kernel = 3            # EnCodec's residual kernel
  m.stem_kernel = 7                # EnCodec's first and last kernel
  m.down_kernel_multiple = 2       # EnCodec: kernel 2 x ratio
  m.up_kernel_multiple = 2
  m.latent_dim = LATENT_DIM
  m.init_std = 0.1                 # narrow-ish layers; see configs/codec/base.py
  q = m.rvq
  q.num_codebooks = 8              # 8 x log2(1024) x 75 Hz = 6 kbps
  q.codebook_size = 1024
  q.codebook_dim = 8
  q.factorized = True
  q.codebook_type = 'ema'          # EnCodec's codebooks are EMA buffers
  return c
