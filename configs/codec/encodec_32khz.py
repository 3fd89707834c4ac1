"""The released 32 kHz EnCodec (facebook/encodec_32khz, MusicGen's codec):
50 Hz x 4 codebooks x 2048 = 2.2 kbps (hop 640), non-causal, weight norm.

Our codec with EnCodec's fixed architecture (export/released/encodec.py,
FIXED_MODEL) and the numbers of its config.json, so `musicjax
import-encodec --config codec/encodec_32khz` checks a download against it,
and a run trained from scratch with it exports to transformers'
EncodecModel (`musicjax export-encodec`). See docs/released_codecs.md.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('codec')
  c.data.sample_rate = 32000
  c.data.channels = 1
  c.data.segment_seconds = 50 * 640 / 32000   # 1 s: whole frames
  m = c.model
  m.encoder_dim = 64                 # num_filters
  m.decoder_dim = 1024               # num_filters * 2 ** len(strides)
  m.latent_dim = 128                 # hidden_size (= codebook_dim)
  m.strides = (4, 4, 5, 8)           # upsampling_ratios (8, 5, 4, 4) reversed
  m.dilations = (1,)                 # num_residual_layers 1, growth 2
  m.residual_kernel = 3
  m.stem_kernel = 7                  # kernel_size
  m.latent_kernel = 7                # last_kernel_size
  m.down_kernel_multiple = 2
  m.up_kernel_multiple = 2
  m.padding = 'same'                 # use_causal_conv false
  m.pad_extra = 'seanet'
  m.pad_mode = 'reflect'
  m.activation = 'elu'
  m.compress = 2
  m.conv_shortcut = False            # use_conv_shortcut false
  m.lstm_layers = 2
  m.up_weight_norm = 'in'
  m.output_tanh = False
  m.output_highpass_hz = 0.0
  m.normalize = False
  q = m.rvq
  q.num_codebooks = 4                # target_bandwidths [2.2]
  q.codebook_size = 2048
  q.codebook_dim = 128
  q.factorized = False
  q.codebook_type = 'ema'
  # Released codebooks need no k-means start. No dead-code restarts:
  # EnCodec's (2 uses per batch) assume its ~4800-frame batches; smaller
  # fine-tuning batches would restart most released codes.
  q.kmeans_init = False
  q.dead_code_threshold = 0.0
  return c
