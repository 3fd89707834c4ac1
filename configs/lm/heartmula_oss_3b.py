"""The released HeartMuLa-oss-3B (heartlib's HeartMuLa, backbone flavor
'llama-3B', decoder flavor 'llama-300M'), exactly: load its weights with
musicjax/export/released/heartmula.py.

A Llama 3.2 backbone (28 layers, width 3072, 24 heads / 8 KV heads, MLP
8192) and a 3-layer local decoder (width 3072, 8 heads / 4 KV heads, MLP
8192), both with RoPE base 500,000 and Llama-3 scaling (factor 32); K = 8
codebooks of 8192 codes, in tables (and heads) of 8197 rows per codebook,
END = 8193 as a codebook-0 class; the 128,256-token Llama-3 text vocabulary
with no LM extra tokens, one learned unconditional row for guidance, a
512-wide MuQ-MuLan reference embedding through a biased linear into the
reference slot, and no melody condition: 3,938,113,536 parameters.

Sampling defaults are heartlib's example's (top-k 50, temperature 1.0,
guidance 1.5); compute in bfloat16, as heartlib's example runs it.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 8
  m.codebook_size = 8192
  m.audio_vocab_size = 8197       # codes + 5 special rows, per codebook
  m.end_id = 8193                 # heartlib gen_config audio_eos_id
  m.text_vocab_size = 128256
  m.text_extra_tokens = False
  m.uncond_embedding = True
  m.reference = 'linear'
  m.reference_dim = 512           # MuQ-MuLan embedding
  m.melody = False
  m.max_seq_len = 8192            # the backbone's rotary table (torchtune)
  for t, layers, heads, kv in ((m.backbone, 28, 24, 8), (m.local, 3, 8, 4)):
    t.num_layers = layers
    t.dim = 3072
    t.num_heads = heads
    t.num_kv_heads = kv
    t.head_dim = 0                # 128
    t.mlp_dim = 8192
    t.norm_eps = 1e-5
    t.rope_theta = 500000.0
    t.rope_scaling = 'llama3'
    t.rope_scale_factor = 32.0
    t.rope_low_freq_factor = 1.0
    t.rope_high_freq_factor = 4.0
    t.rope_original_context = 8192
    t.dtype = 'bfloat16'
  m.local.scan_layers = False     # 3 layers

  c.data.reference_frames = 0     # the reference is a given embedding
  c.cond.melody = False
  s = c.sample
  s.temperature = 1.0
  s.top_k = 50
  s.top_k_keep_ties = True        # heartlib's top-k keeps ties
  s.cfg_scale = 1.5
  s.seconds = 120.0               # heartlib's pipeline: max_audio_length_ms 120,000
  # Memory first (users of heartlib report 12-13 GB): heads in bfloat16, as
  # heartlib's autocast runs them, and the backbone's weights read in place
  # instead of copied per layer. Compiled for a 240 s song on one device
  # (jax 0.12.1): the LM's program 9.18 GiB with these, 14.78 GiB with
  # fused weights (`bench heartmula-memory`, docs/figures.md). Fused weights are
  # faster where memory allows: --config.sample.backbone_weights=fused.
  s.head_dtype = 'bfloat16'
  s.backbone_weights = 'stacked'
  return c
