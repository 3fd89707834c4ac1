"""An accompaniment model of VampNet's tiny size, for timing only.

It matches VampNet's tiny model built with VampNet's own code (8 layers x 256 wide, 4 heads, 4 codebooks x 1024,
bidirectional), so `musicjax bench accomp` sits beside VampNet's generate():

  musicjax bench accomp --config configs/accomp/vampnet_tiny_size.py \
      --frames 750,3000 --steps 12,36

VampNet's feed-forward is GEGLU from 256 to 4 x 256 (two halves) and back
from 2 x 256: the same weights and FLOPs as this model's SwiGLU of hidden
width 512 (gate and up 256 -> 512 each, down 512 -> 256). The frame
rate is the peer script's default for its RTF (VB_HZ = 25), so 750 frames are
30 s there and here. Differences that remain: this model reads a vocal track
beside the accompaniment (4 codebooks each, both in the 256 width) and a
text/reference prefix, and samples with top-k/top-p where VampNet filters
with typical sampling; compare with guidance off (`rtf_nocfg`), as VampNet's
generate() runs without it. Random weights, no data: not for training.
"""
from musicjax.config import for_task

FRAME_RATE = 25.0                 # vampnet_bench.py's VB_HZ default


def get_config():
  c = for_task('accomp')
  m = c.model
  m.num_codebooks = 4             # VampNet's coarse model
  m.codebook_size = 1024
  m.frame_rate = FRAME_RATE
  b = m.backbone
  b.num_layers = 8
  b.dim = 256
  b.num_heads = 4
  b.num_kv_heads = 4              # VampNet: plain multi-head attention
  b.mlp_dim = 512                 # VampNet's GEGLU: 256 -> 2 x 512 -> 256
  b.scan_layers = False           # small stacks run faster unrolled on XLA:CPU
  b.attention_chunk = 1024        # whole songs in one pass: [heads, 1024, T] scores
  c.data.kind = 'synthetic'       # timing only: no token data needed
  return c
