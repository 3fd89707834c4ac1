"""Tiny accompaniment model, curriculum stage 1: short windows, all songs.

Tokens: the tiny codec's (16 kHz, 62.5 Hz, 4 x 256) with stems:
  musicjax train --config configs/codec/tiny.py --workdir runs/codec
  musicjax prepare --codec-workdir runs/codec --out runs/stems --stems
  musicjax train --config configs/accomp/tiny.py --workdir runs/accomp
Stage 2 (configs/accomp/tiny_stage2.py) continues from this run.
Windows of 4 s (250 frames) with a 2 s reference segment; prefixes dropped
with p = 0.5 each; MLM + 0.2 x RTD with the gradient reaching the backbone.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('accomp')
  m = c.model
  m.num_codebooks = 4
  m.codebook_size = 256
  m.frame_rate = 62.5
  m.text_vocab_size = 8192        # the default tokenizer size of `musicjax prepare`
  b = m.backbone
  b.num_layers = 4
  b.dim = 256                     # 128 per track
  b.num_heads = 4
  b.num_kv_heads = 2
  b.mlp_dim = 768
  b.scan_layers = False           # small stacks train faster unrolled on XLA:CPU
  b.attention_chunk = 1024        # whole songs in one pass: [heads, 1024, T] scores

  d = c.data
  d.kind = 'tokens'
  d.path = 'runs/demo/stems'
  d.max_frames = 250
  d.reference_frames = 125
  d.max_text_tokens = 32
  d.batch_size = 8
  d.eval_batch_size = 8

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.eval_steps = 4

  # Songs are sampled in windows of the trained length (positions beyond it
  # were never seen), each overlapping the previous by 1 s.
  c.sample.window_frames = 250
  c.sample.overlap_frames = 62
  return c
