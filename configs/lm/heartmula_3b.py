"""HeartMuLa at paper scale (seed 001 §3.3.3): a 3B global transformer and a
local transformer of 3 layers at the same width, K = 8 x 8192 at 12.5 Hz.

Sharding: parameters are FSDP-sharded on their 'embed' dim and tensor-parallel
on heads / MLP / vocabulary. Two layouts (pick with --config.mesh.*):
  * TPU v5p-64 (64 chips): mesh data=1, fsdp=16, tensor=4  (the default below)
  * 8 x H100: mesh data=1, fsdp=4, tensor=2
`musicjax bench lm-memory --config configs/lm/heartmula_3b.py --devices 64`
prints the per-device memory estimate of either layout.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 8
  m.codebook_size = 8192
  m.text_vocab_size = 65536
  m.max_seq_len = 8192
  b = m.backbone
  b.num_layers = 28
  b.dim = 3072
  b.num_heads = 24
  b.num_kv_heads = 8
  b.mlp_dim = 8192
  b.rope_theta = 500000.0
  b.dtype = 'bfloat16'
  b.remat = 'dots'
  lo = m.local
  lo.num_layers = 3
  lo.dim = 3072
  lo.num_heads = 8
  lo.num_kv_heads = 4
  lo.mlp_dim = 8192
  lo.dtype = 'bfloat16'
  lo.remat = 'dots'

  d = c.data
  d.kind = 'tokens'
  d.max_frames = 3750             # 5 min at 12.5 Hz (pretraining: full songs)
  d.max_text_tokens = 1024
  d.reference_frames = 125        # 10 s (seed 001 §3.2)
  d.batch_size = 64
  d.eval_batch_size = 64

  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 4

  c.optim.lr = 2e-4               # warm-up stage; pretraining anneals to 2e-5
  c.optim.warmup_steps = 2000
  c.cond.drop_all = 0.02          # CFG dropout probability (seed 001 §3.3.3)
  c.train.steps = 500000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.checkpoint_every = 2000
  return c
