"""LaDA-Band 1B, stage 1, at the paper's scale (seed 003 §4, appendix A).

Backbone of Llama-3.2-1B shape (16 layers, 2048, 32 heads, 8 KV heads, MLP
8192), one codebook of 16384 at 25 Hz (MuCodec's setting; K = 1 is the
paper's model exactly), 102.4 s windows (2560 frames) with a 20.48 s
reference. Stage 2: `--config.data.max_frames=4096 --config.init.workdir=...`
with the quality filter on. Needs a codec of that shape (configs/codec/) and
an accelerator mesh: fsdp over all devices by default.
"""
from musicjax.config import for_task


def get_config():
  c = for_task('accomp')
  m = c.model
  m.num_codebooks = 1
  m.codebook_size = 16384
  m.frame_rate = 25.0
  m.text_vocab_size = 8192
  b = m.backbone
  b.num_layers = 16
  b.dim = 2048
  b.num_heads = 32
  b.num_kv_heads = 8
  b.head_dim = 64
  b.mlp_dim = 8192
  b.dtype = 'bfloat16'
  b.remat = 'full'
  b.attention_chunk = 2048

  d = c.data
  d.kind = 'tokens'
  d.max_frames = 2560
  d.reference_frames = 512
  d.max_text_tokens = 64
  d.batch_size = 64

  c.optim.lr = 1e-5                 # the released s1 config
  c.optim.warmup_steps = 5000
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.train.steps = 10000
  c.sample.window_frames = 4096     # stage-2 windows
  c.sample.overlap_frames = 512
  return c
