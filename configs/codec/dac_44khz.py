"""The released 44.1 kHz DAC (descript/dac_44khz): 86 Hz x 9 codebooks x
1024 = 7.75 kbps (hop 512), ~76M parameters.

Our codec with DAC's fixed architecture (export/released/dac.py, FIXED_MODEL)
and the numbers of its config.json, so `musicjax import-dac --config
codec/dac_44khz` checks a download against it, and a run trained from
scratch with it exports to transformers' DacModel (`musicjax export-dac`).
See docs/released_codecs.md.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('codec')
  c.data.sample_rate = 44100
  c.data.channels = 1
  # About DAC's 0.38 s training excerpts, in whole frames: 33 x 512 samples.
  c.data.segment_seconds = 33 * 512 / 44100
  m = c.model
  m.encoder_dim = 64
  m.decoder_dim = 1536
  m.latent_dim = 1024                # encoder_dim * 2 ** len(strides)
  m.strides = (2, 4, 8, 8)
  m.dilations = (1, 3, 9)
  m.residual_kernel = 7
  m.stem_kernel = 7
  m.latent_kernel = 3
  m.down_kernel_multiple = 2
  m.up_kernel_multiple = 2
  m.padding = 'same'
  m.pad_extra = 'left'               # torch padding=ceil(stride / 2)
  m.output_tanh = True
  m.output_highpass_hz = 0.0         # DAC has none
  m.normalize = False
  q = m.rvq
  q.num_codebooks = 9
  q.codebook_size = 1024
  q.codebook_dim = 8
  q.factorized = True
  q.codebook_type = 'learned'
  q.quantizer_dropout = 0.0          # its config.json; DAC trained with 0.5
  # Released codebooks need no k-means start, and DAC has no restarts.
  q.kmeans_init = False
  q.dead_code_threshold = 0.0
  c.loss.commit_weight = 0.25
  c.loss.codebook_weight = 1.0
  return c
