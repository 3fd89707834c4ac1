"""The LM speed-comparison configuration (exactly as the LM issue specifies).

Global transformer 4 layers, local transformer 2 layers, width 256, 4 query /
2 KV heads, FFN 1024, RoPE; K = 8 codebooks x 8192; text vocabulary 1024.
`musicjax bench lm-decode` / `lm-train` run it on random weights and
synthetic tokens, so it needs no data.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 8
  m.codebook_size = 8192
  m.text_vocab_size = 1024
  for t in (m.backbone, m.local):
    t.dim = 256
    t.num_heads = 4
    t.num_kv_heads = 2
    t.mlp_dim = 1024
    t.rope_theta = 10000.0
  m.backbone.num_layers = 4
  m.local.num_layers = 2
  # Small stacks: unrolled layers train faster on XLA:CPU (see scan_layers).
  m.backbone.scan_layers = False
  m.local.scan_layers = False

  c.data.kind = 'synthetic'
  c.data.max_frames = 250          # 20 s at 12.5 Hz
  c.data.max_text_tokens = 64
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.markov_noise = (2,) * 7
  c.sample.cfg_scale = 1.5
  return c
