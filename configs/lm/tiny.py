"""Tiny LM: trains on chorale tokens on 2 CPU cores in minutes.

Tokens come from the tiny codec (16 kHz, 62.5 Hz, 4 x 256):
  musicjax train --config configs/codec/tiny.py --workdir runs/codec
  musicjax prepare --codec-workdir runs/codec --out runs/tokens
  musicjax train --config configs/lm/tiny.py --workdir runs/lm \
      --config.data.path=runs/tokens
Windows of 4 s (250 frames) with tags, lyrics (prefix layout), melody and a
2 s reference segment; warm-up/pretraining loss weights (λ0 = 1, λk = 1).
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 4
  m.codebook_size = 256
  m.text_vocab_size = 8192        # the default tokenizer size of `musicjax prepare`
  for t in (m.backbone, m.local):
    t.dim = 128
    t.num_heads = 4
    t.num_kv_heads = 2
    t.mlp_dim = 512
  m.backbone.num_layers = 4
  m.local.num_layers = 2
  # Small stacks: unrolled layers train faster on XLA:CPU (see scan_layers).
  m.backbone.scan_layers = False
  m.local.scan_layers = False
  m.max_seq_len = 4096

  d = c.data
  d.kind = 'tokens'
  d.path = 'runs/demo/stems'     # make demo's tokens (mix + stems)
  d.layout = 'prefix'
  d.max_frames = 250
  d.max_text_tokens = 96
  d.reference_frames = 125
  d.batch_size = 8
  d.eval_batch_size = 8

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.steps = 800
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.checkpoint_every = 400
  c.train.eval_steps = 4
  c.train.eval_at_start = True
  c.sample.cfg_scale = 1.5
  c.sample.top_k = 50
  return c
