"""A tiny model of the released HeartMuLa's structure (heartmula_oss_3b.py)
for tests: tests/fixtures/heartmula_tiny holds heartlib's checkpoint and
outputs at these numbers (see its README).

Codes 16 in tables of 21 rows (16 + 5, as 8192 + 5), END = 17 (as 8193),
text vocabulary 64, reference embedding 8 wide; a 2-layer backbone of width
32 (4 heads / 2 KV heads) and a 2-layer decoder of width 16 (2 heads / 1 KV
head), RoPE base 500,000 with Llama-3 scaling as released.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 8
  m.codebook_size = 16
  m.audio_vocab_size = 21
  m.end_id = 17
  m.text_vocab_size = 64
  m.text_extra_tokens = False
  m.uncond_embedding = True
  m.reference = 'linear'
  m.reference_dim = 8
  m.melody = False
  m.max_seq_len = 64
  for t, layers, dim, heads, kv, mlp in ((m.backbone, 2, 32, 4, 2, 64),
                                         (m.local, 2, 16, 2, 1, 32)):
    t.num_layers = layers
    t.dim = dim
    t.num_heads = heads
    t.num_kv_heads = kv
    t.head_dim = 0                # 8
    t.mlp_dim = mlp
    t.norm_eps = 1e-5
    t.rope_theta = 500000.0
    t.rope_scaling = 'llama3'
    t.rope_scale_factor = 32.0
    t.rope_low_freq_factor = 1.0
    t.rope_high_freq_factor = 4.0
    t.rope_original_context = 8192
    t.dtype = 'float32'
    t.scan_layers = False

  d = c.data
  d.max_frames = 8
  d.max_text_tokens = 16
  d.reference_frames = 0
  c.cond.melody = False
  return c
