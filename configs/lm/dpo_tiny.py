"""Tiny DPO run: preference fine-tuning of the tiny LM (configs/lm/tiny.py).

  musicjax train --config configs/lm/tiny.py --workdir runs/demo/lm
  musicjax prefs --workdir runs/demo/lm --out runs/demo/pairs.jsonl \
      --prompts 64 --candidates 4 --seconds 4 --metric chroma --margin 0.1
  musicjax train --config configs/lm/dpo_tiny.py --workdir runs/demo/dpo
The model section must equal the LM run's (the run checks it); data.path is
the LM's token set (tokenizer and codec facts for `musicjax generate`).
"""
from musicjax.config import for_task


def get_config():
  c = for_task('lm_dpo')
  m = c.model
  m.variant = 'global_local'
  m.num_codebooks = 4
  m.codebook_size = 256
  m.text_vocab_size = 8192
  for t in (m.backbone, m.local):
    t.dim = 128
    t.num_heads = 4
    t.num_kv_heads = 2
    t.mlp_dim = 512
  m.backbone.num_layers = 4
  m.local.num_layers = 2
  m.max_seq_len = 4096

  d = c.data
  d.kind = 'tokens'
  d.path = 'runs/demo/tokens'
  d.layout = 'prefix'
  d.max_frames = 250
  d.max_text_tokens = 96
  d.reference_frames = 125
  d.batch_size = 8                # pairs per step (16 sequences)
  d.eval_batch_size = 8

  p = c.dpo
  p.init_workdir = 'runs/demo/lm'
  p.pairs = 'runs/demo/pairs.jsonl'
  p.beta = 0.1
  p.eval_fraction = 0.1

  # The paper uses lr 1e-7 for its 3B model; a tiny model trained for a few
  # hundred steps needs a larger step to move at all.
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 10
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.eval_steps = 2
  c.sample.cfg_scale = 1.5
  c.sample.top_k = 50
  return c
