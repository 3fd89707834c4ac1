"""MusicGen's structure (musicgen_small.py) at the speed-comparison size:
what `musicjax bench lm-decode` times beside transformers' own
MusicgenForConditionalGeneration built at the same numbers (peer script
musicgen_bench.py, docs/figures.md).

Everything of musicgen_small.py (4 x 2048 codes over the delay pattern,
LayerNorm, GELU, sinusoidal positions, cross-attention to T5 states
projected into the decoder, guidance 3, top-k 250) except the sizes:
decoder 4 layers of width 256 (4 heads, FFN 1024), T5 2 layers of width
256 (4 heads of 64, FFN 1024); float32, as the peer runs on CPU. Random
weights, no data.
"""
from musicjax import config as config_lib


def get_config():
  c = config_lib.load('lm/musicgen_small')
  m = c.model
  b = m.backbone
  b.num_layers = 4
  b.dim = 256
  b.num_heads = 4
  b.num_kv_heads = 4
  b.mlp_dim = 1024
  b.scan_layers = False          # small stacks run faster unrolled on XLA:CPU
  t = m.t5
  t.num_layers = 2
  t.dim = 256
  t.num_heads = 4
  t.head_dim = 64
  t.mlp_dim = 1024
  c.sample.head_dtype = 'float32'
  c.sample.backbone_weights = 'fused'
  d = c.data
  d.kind = 'synthetic'
  d.max_frames = 250             # 5 s at 50 Hz
  d.batch_size = 4
  d.eval_batch_size = 4
  return c
