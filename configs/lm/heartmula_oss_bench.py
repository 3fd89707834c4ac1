"""The released HeartMuLa's structure at the speed-comparison size: what
`musicjax bench lm-decode` times beside heartlib's own HeartMuLa class
built at the same numbers (peer script hm_tiny_bench.py, docs/figures.md).

Everything of heartmula_oss_3b.py (8197-wide tables and heads, END 8193,
Llama-3 rotary scaling, the unconditional row, the 512-wide reference
linear) except the sizes: backbone 4 layers and local decoder 2 layers,
width 256, 4 query / 2 KV heads, FFN 1024, text vocabulary 1024, 2048
positions; float32, as the peer runs on CPU. Random weights, no data.
"""
from musicjax import config as config_lib


def get_config():
  c = config_lib.load('lm/heartmula_oss_3b')
  m = c.model
  m.text_vocab_size = 1024
  m.max_seq_len = 2048
  for t, layers in ((m.backbone, 4), (m.local, 2)):
    t.num_layers = layers
    t.dim = 256
    t.num_heads = 4
    t.num_kv_heads = 2
    t.mlp_dim = 1024
    t.dtype = 'float32'
    t.scan_layers = False        # small stacks run faster unrolled on XLA:CPU
  # The peer runs float32 heads and our fastest CPU decode is the fused one.
  c.sample.head_dtype = 'float32'
  c.sample.backbone_weights = 'fused'
  d = c.data
  d.kind = 'synthetic'
  d.max_frames = 250             # 20 s at 12.5 Hz
  d.max_text_tokens = 64
  d.batch_size = 4
  d.eval_batch_size = 4
  d.markov_noise = (2,) * 7
  return c
