"""The released MusicGen small (facebook/musicgen-small; the paper's "300M"
decoder has 420M parameters counted with its cross-attention) as our
single_stream LM: what `musicjax import-musicgen` builds from its
config.json (export/released/musicgen.py; tests/test_lm_configs.py checks
that the two agree).

A 24-layer decoder of width 1024 (16 heads, FFN 4096) with LayerNorm, a
GELU MLP, sinusoidal positions and cross-attention to T5-base's states
projected 768 -> 1024; 4 codebooks of 2048 codes (EnCodec 32 kHz, 50 Hz)
over the delay pattern, tables of 2049 rows (the last is the pad / start
id), heads over the codes only; 2048 positions (about 40 s). Sampling as
the release's generation_config.json: top-k 250 is audiocraft's, guidance 3.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'single_stream'
  m.pattern = 'delay'
  m.num_codebooks = 4
  m.codebook_size = 2048
  m.end_token = False
  m.text_vocab_size = 0
  m.text_extra_tokens = False
  m.reference = 'none'
  m.melody = False
  m.max_seq_len = 2048
  m.text_encoder = 't5'
  t = m.t5                       # t5-base
  t.vocab_size = 32128
  t.dim = 768
  t.num_heads = 12
  t.head_dim = 64
  t.mlp_dim = 3072
  t.num_layers = 12
  t.mlp = 'relu'
  t.relative_buckets = 32
  t.relative_max_distance = 128
  t.norm_eps = 1e-6
  m.context_proj = True
  b = m.backbone
  b.num_layers = 24
  b.dim = 1024
  b.num_heads = 16
  b.num_kv_heads = 16
  b.head_dim = 0
  b.mlp_dim = 4096
  b.norm = 'layer'
  b.mlp = 'gelu'
  b.positions = 'sinusoidal'
  b.cross_attention = True
  b.norm_eps = 1e-5
  b.dtype = 'float32'
  d = c.data
  d.max_text_tokens = 1          # the start slot
  d.max_frames = 1500            # 30 s at 50 Hz
  c.cond.melody = False
  c.loss.local_weighting = 'mean'   # MusicGen's objective: codebooks alike
  s = c.sample
  s.cfg_scale = 3.0
  s.top_k = 250
  s.temperature = 1.0
  s.seconds = 10.0
  return c
