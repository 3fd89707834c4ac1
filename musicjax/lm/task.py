"""The audio-token LM as a trainer task (both variants, both layouts).

Batches are slot sequences (musicjax/lm/layout.py) built on the host by the
token pipeline (musicjax/lm/token_data.py), or by the synthetic Markov source
(musicjax/lm/data.py, musicjax/lm/synthetic.py) whose exact entropy tests the
whole training path.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicjax.config import ConfigError
from musicjax.kernels import decode_attention as kernel_lib
from musicjax.kernels import dispatch
from musicjax.lm import data
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import patterns
from musicjax.lm import summaries as summaries_lib
from musicjax.lm import token_data
from musicjax.nn import lora
from musicjax.nn import t5
from musicjax.nn import transformer
from musicjax.train import accumulate
from musicjax.train.task import ArraySpec, Task

ConfigDict = ml_collections.ConfigDict


class StepCounter(nnx.Variable):
  """Completed train steps (not touched by the optimizer)."""


def default_config() -> ConfigDict:
  """Every LM number; defaults are the bench_tiny scale."""
  c = ConfigDict()
  m = c.model = ConfigDict()
  m.variant = 'global_local'      # global_local (HeartMuLa) | single_stream (MusicGen)
  m.pattern = 'delay'             # single_stream: delay | parallel | flatten
  m.num_codebooks = 8
  m.codebook_size = 8192
  m.text_vocab_size = 1024        # the tokenizer's vocabulary (LM extras come after)
  m.embed_init_std = 0.02
  m.max_seq_len = 8192            # slots a sequence may have (generate checks it)
  # Embedding and head layout (model.check_config): musicjax's own by default;
  # configs/lm/heartmula_oss_3b.py sets the released HeartMuLa's.
  m.audio_vocab_size = 0          # rows per codebook table = head widths; 0: ours
                                  # (codebook_size + 2 rows, heads + END / codes)
  m.end_id = -1                   # codebook-0 class ending a song; -1: codebook_size
  m.text_extra_tokens = True      # layout.EXTRA_TOKENS after the tokenizer's ids
  m.uncond_embedding = False      # one learned row for every text slot of
                                  # guidance's unconditional rows (batch 'uncond')
  m.reference = 'pooled'          # pooled (ref codes, added to <ref>) | linear
                                  # (a given embedding, replaces the ref slot)
  m.reference_dim = 0             # linear: width of the given embedding
  m.melody = True                 # melody-class table
  # MusicGen's layout (configs/lm/musicgen_*.py): text enters by cross-
  # attention to a text encoder's states (text_vocab_size 0: no text slots),
  # and the heads predict codes only, so a song runs to its length.
  m.end_token = True              # codebook 0 has an END class (False: single_stream)
  m.text_encoder = ''             # '' | t5 (cross: needs backbone.cross_attention)
  m.t5 = t5.default_config()      # text_encoder 't5'
  m.text_encoder_trainable = False  # False: frozen in training (MusicGen's way)
  m.context_proj = True           # biased linear encoder width -> backbone.dim
  # MusicGen-Melody: the chroma and text states as a prefix of the sequence
  # instead of cross-attention (model.py, docs/musicgen.md).
  m.conditioning = 'cross'        # cross | prefix (no backbone.cross_attention)
  m.chroma_bins = 0               # prefix: chroma classes of a melody (12)
  m.chroma_length = 0             # prefix: chroma frames before the text states
  m.chroma_proj = True            # prefix: biased linear chroma_bins -> backbone.dim
  m.backbone = transformer.default_config()
  m.local = transformer.default_config()
  m.local.num_layers = 2

  d = c.data = ConfigDict()
  d.kind = 'tokens'               # tokens (musicjax prepare --codec-workdir) | synthetic
  d.layout = 'prefix'             # prefix (HeartMuLa) | interleaved (Muse sections)
  d.max_frames = 250              # audio frames per training window
  d.max_text_tokens = 64          # condition text slots (tags, lyrics, markers)
  d.max_sections = 4              # interleaved: sections per window (each adds an END slot)
  d.reference_frames = 0          # reference segment length (0 = no reference condition)
  d.max_context_tokens = 64       # text-encoder tokens of a description (MusicGen)
  d.tokenizer = ''                # '' = DATA_DIR/tokenizer.json
  d.markov_branching = 2          # synthetic: successors per codebook-0 state
  d.markov_noise = (2, 2, 2, 2, 2, 2, 2)  # synthetic: noise values per codebook 1..K-1
  d.markov_seed = 0

  cd = c.cond = ConfigDict()
  # Probability of keeping each tag category (seed 001 table 6); others 0.5.
  cd.tag_probs = (('genre', 0.95), ('timbre', 0.5), ('gender', 0.375),
                  ('mood', 0.325), ('instrument', 0.25), ('scene', 0.2),
                  ('region', 0.125), ('topic', 0.1))
  cd.extra_tag_prob = 0.5
  # Classifier-free-guidance dropout: each field replaced by its learned null.
  cd.drop_tags = 0.1
  cd.drop_lyrics = 0.1
  cd.drop_melody = 0.5
  cd.drop_reference = 0.5
  cd.drop_all = 0.02              # all conditions at once (seed 001 §3.3.3)
  cd.melody = True

  lo = c.loss = ConfigDict()
  lo.global_weight = 1.0          # λ0 (pretraining 1.0, SFT 2.0)
  lo.local_weighting = 'uniform'  # uniform (λk = 1) | sft (λk = (K - k) / 10)

  o = c.optim = ConfigDict()
  o.lr = 3e-4
  o.warmup_steps = 100
  o.schedule = 'cosine'           # cosine | constant
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.1
  o.clip = 1.0

  s = c.sample = ConfigDict()
  s.temperature = 1.0
  s.top_k = 50
  s.top_p = 1.0
  # True: tokens tied with the k-th best logit are kept too (heartlib's
  # top-k); False: exactly k, ties to the lower token id.
  s.top_k_keep_ties = True
  s.cfg_scale = 1.5               # 3.0 is MusicGen's default for the delay pattern
  s.seconds = 10.0                # `musicjax generate`'s length without --seconds
  s.stream_every = 0              # frames between streaming callbacks (0 = off)
  # Output-head weights in the decode loop. bfloat16 halves the step's largest
  # memory reads (logits accumulate in float32); float32 is exact.
  s.head_dtype = 'float32'
  # Backbone weights in the decode loop: fused (per-layer copies with q|k|v
  # and gate|up joined: fewest matmuls, fastest on CPU) | stacked (read in
  # place by a scan: no second copy of the weights while generating, for
  # models whose weights are most of the memory; XLA attention only).
  s.backbone_weights = 'fused'
  # Weight-only quantized inference (`generate`): the stacks' attention and
  # MLP weights held as int8 / int4 (qwix; nn/lora.py), dequantized where
  # read. The fused decode path dequantizes once per song; `stacked` reads
  # them in place at every step.
  s.weights = 'float'             # float | bfloat16 | int8 | int4
  # Global-transformer decode attention (kernels/dispatch.py): auto = the
  # Pallas kernel on GPU/TPU, XLA on CPU; xla | pallas force one (pallas runs
  # in the interpreter on CPU). The kernel's cache is rounded up to
  # attention_block_k * attention_splits slots.
  s.attention = 'auto'
  s.attention_block_k = 128
  s.attention_splits = 8

  # TensorBoard summaries at eval steps (musicjax/lm/summaries.py): a clip
  # generated with the sample settings above for the first eval example's
  # conditions, beside its real tokens, decoded with the token set's codec.
  su = c.summary = ConfigDict()
  su.seconds = 4.0                # generated clip length (0 = no summaries)
  return c


def make_optimizer(o: ConfigDict, steps: int) -> optax.GradientTransformation:
  if o.schedule == 'cosine':
    sched = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(o.warmup_steps, 1), max(steps, o.warmup_steps + 1),
        end_value=o.lr * o.min_lr_ratio)
  elif o.schedule == 'constant':
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
         optax.constant_schedule(o.lr)], [max(o.warmup_steps, 1)])
  else:
    raise ConfigError(f"config.optim.schedule must be 'cosine' or 'constant', "
                      f'got {o.schedule!r}')
  return optax.chain(optax.clip_by_global_norm(o.clip),
                     optax.adamw(sched, b1=o.b1, b2=o.b2,
                                 weight_decay=o.weight_decay))


def trainable(config: ConfigDict):
  """What the optimizer trains: the adapters of a LoRA run, else the LM's
  trainable weights."""
  if lora.enabled(config):
    return nnx.LoRAParam
  return model_lib.trainable(config.model)


class LMState(nnx.Module):

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    self.model = model_lib.AudioLM(config.model, rngs)
    if lora.enabled(config):
      lora.apply(self.model, config, rngs)
    self.opt = nnx.Optimizer(self.model, make_optimizer(config.optim,
                                                        config.train.steps),
                             wrt=trainable(config))
    self.step = StepCounter(jnp.zeros((), jnp.int32))


def check_config(config: ConfigDict) -> None:
  m, d = config.model, config.data
  if m.variant not in model_lib.VARIANTS:
    raise ConfigError(f'config.model.variant must be one of {model_lib.VARIANTS}, '
                      f'got {m.variant!r}')
  if m.pattern not in patterns.KINDS:
    raise ConfigError(f'config.model.pattern must be one of {patterns.KINDS}, '
                      f'got {m.pattern!r}')
  transformer.check_config(m.backbone, 'model.backbone')
  model_lib.check_config(m)
  if m.variant == 'global_local':
    transformer.check_config(m.local, 'model.local')
    if m.num_codebooks < 2:
      raise ConfigError('config.model.num_codebooks must be >= 2 for the '
                        "global_local variant (use variant='single_stream' "
                        'for a one-codebook token LM)')
  if d.layout not in ('prefix', 'interleaved'):
    raise ConfigError(f"config.data.layout must be 'prefix' or 'interleaved', "
                      f'got {d.layout!r}')
  if d.kind not in ('tokens', 'synthetic'):
    raise ConfigError(f"config.data.kind must be 'tokens' or 'synthetic' for "
                      f'the LM, got {d.kind!r}')
  if layout.seq_len(config) > m.max_seq_len:
    raise ConfigError(f'config.data: a training sequence has {layout.seq_len(config)} '
                      f'slots, more than config.model.max_seq_len={m.max_seq_len}')
  if config.loss.local_weighting not in model_lib.WEIGHTINGS:
    raise ConfigError(f'config.loss.local_weighting must be one of '
                      f'{model_lib.WEIGHTINGS}, got '
                      f'{config.loss.local_weighting!r}')
  if config.summary.seconds < 0:
    raise ConfigError('config.summary.seconds must be >= 0 (0 = no '
                      f'summaries), got {config.summary.seconds}')
  s = config.sample
  if s.weights not in lora.SERVING:
    raise ConfigError(f'config.sample.weights must be one of {lora.SERVING}, '
                      f'got {s.weights!r}')
  if s.attention not in dispatch.IMPLS:
    raise ConfigError(f'config.sample.attention must be one of {dispatch.IMPLS}, '
                      f'got {s.attention!r}')
  try:
    kernel_lib.check_params(gen.sampling_from_config(s).kernel_params(), 'triton')
  except ValueError as e:
    raise ConfigError(f'config.sample.attention_block_k / attention_splits: {e}'
                      ) from None
  try:
    gen.sampling_from_config(s).validate()
  except ValueError as e:
    raise ConfigError(f'config.sample: {e}') from None




# Model keys a warm start may change (musicjax/train/warm_start.py): neither
# the weights' shapes nor the function they compute (scanned and unrolled
# layers share one stacked layout).
FREE_MODEL_KEYS = ('embed_init_std', 'max_seq_len', 'backbone.init_std',
                   'backbone.dtype', 'backbone.remat', 'backbone.scan_layers',
                   'backbone.attention_chunk', 'local.init_std', 'local.dtype',
                   'local.remat', 'local.scan_layers', 'local.attention_chunk')


class LMTask(Task):
  name = 'lm'
  progress_metrics = ('loss', 'ce/0', 'ce/1')
  warm_start_tasks = ('lm', 'lm_dpo')     # both hold an AudioLM under `model`
  free_model_keys = FREE_MODEL_KEYS
  supports_grad_accum = True
  supports_lora = True

  @classmethod
  def default_config(cls) -> ConfigDict:
    return default_config()

  def __init__(self, config: ConfigDict):
    super().__init__(config)
    check_config(config)

  def create_state(self, rngs: nnx.Rngs) -> LMState:
    return LMState(self.config, rngs)

  def inference_model(self, state: LMState) -> model_lib.AudioLM:
    return state.model

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    s, k = layout.seq_len(self.config), self.config.model.num_codebooks
    spec = {
        'text': ArraySpec((batch_size, s), np.int32, ('batch', 'time')),
        'audio': ArraySpec((batch_size, s, k), np.int32, ('batch', 'time', None)),
        'melody': ArraySpec((batch_size, s), np.int32, ('batch', 'time')),
        'positions': ArraySpec((batch_size, s), np.int32, ('batch', 'time')),
        'valid': ArraySpec((batch_size, s), bool, ('batch', 'time')),
    }
    r = self.config.data.reference_frames
    if r:
      spec['ref_codes'] = ArraySpec((batch_size, r, k), np.int32,
                                    ('batch', None, None))
      spec['ref_valid'] = ArraySpec((batch_size,), bool, ('batch',))
    if self.config.model.text_encoder:
      n = int(self.config.data.max_context_tokens)
      spec['context_tokens'] = ArraySpec((batch_size, n), np.int32,
                                         ('batch', None))
      spec['context_valid'] = ArraySpec((batch_size, n), bool, ('batch', None))
    if data.has_chroma(self.config):
      m = self.config.model
      spec['chroma'] = ArraySpec((batch_size, m.chroma_length, m.chroma_bins),
                                 np.float32, ('batch', None, None))
    return spec

  def _loss(self, model, batch):
    lo = self.config.loss
    # A window holds at most max_frames real frames: the local transformer
    # runs on those slots only.
    return model_lib.loss_and_metrics(model, batch, lo.global_weight,
                                      lo.local_weighting,
                                      self.config.data.max_frames)

  def _loss_sums(self, model, batch) -> dict[str, jax.Array]:
    """Per-codebook sums over the batch: cross entropy and token count."""
    logits = model(batch, self.config.data.max_frames)
    _, _, ce, mask = model_lib.token_log_probs(model, batch, logits)
    return {'ce': jnp.sum(ce, axis=(0, 1)),
            'tokens': jnp.sum(mask.astype(jnp.float32), axis=(0, 1))}

  def _loss_from_sums(self, sums):
    """`_loss` from the batch's `_loss_sums` (gradient accumulation): the
    same per-codebook means, so the same loss and metrics."""
    lo, k = self.config.loss, self.config.model.num_codebooks
    per_k = sums['ce'] / jnp.maximum(sums['tokens'], 1.0)
    total = model_lib.total_loss(per_k, lo.global_weight, lo.local_weighting)
    metrics = {'loss': total, 'ce/mean': jnp.sum(sums['ce']) / jnp.maximum(
        jnp.sum(sums['tokens']), 1.0)}
    for i in range(k):
      metrics[f'ce/{i}'] = per_k[i]
      metrics[f'ppl/{i}'] = jnp.exp(per_k[i])
    metrics['tokens'] = jnp.sum(sums['tokens'])
    return total, metrics

  def _value_and_grad(self, model, batch):
    """(metrics, grads w.r.t. the model's Params) of one step's batch, in
    config.train.grad_accum micro-batches when that is > 1."""
    gdef, params, rest = nnx.split(model, trainable(self.config), ...)
    n = int(self.config.train.grad_accum)
    if n == 1:
      def loss_fn(p):
        return self._loss(nnx.merge(gdef, p, rest), batch)

      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return metrics, grads
    axes = {k: v.logical_axes for k, v in
            self.batch_spec(self.config.data.batch_size).items()}
    _, metrics, grads = accumulate.value_and_grad(
        lambda p, mb: self._loss_sums(nnx.merge(gdef, p, rest), mb),
        self._loss_from_sums, params, batch, n, counts=('tokens',),
        logical_axes=axes)
    return metrics, grads

  def train_step(self, state: LMState, batch, rng):
    del rng  # condition dropout happens in the data pipeline (seeded, resumable)
    metrics, grads = self._value_and_grad(state.model, batch)
    state.opt.update(state.model, grads)
    state.step[...] = state.step[...] + 1
    metrics['optim/grad_norm'] = optax.tree.norm(grads)
    return metrics

  def eval_step(self, state: LMState, batch, rng):
    del rng
    _, metrics = self._loss(state.model, batch)
    return metrics

  def finalize_metrics(self, averaged):
    # Perplexity of the window is exp of its mean cross-entropy, not the mean
    # of per-step perplexities.
    out = dict(averaged)
    for key, value in averaged.items():
      if key.startswith('ce/') and key != 'ce/mean':
        out['ppl/' + key[3:]] = float(np.exp(value))
    return out

  def dataset(self, split: str, shard_index: int, shard_count: int):
    if self.config.data.kind == 'synthetic':
      return data.synthetic_dataset(self.config, split, shard_index, shard_count)
    return token_data.token_dataset(self.config, split, shard_index, shard_count)

  @functools.cached_property
  def _summaries(self):
    # Built on first use: the codec and the jitted loop are kept for the run.
    return summaries_lib.LMSummaries(self.config)

  def summaries(self, state: LMState, batch, rng):
    """A generated clip beside the batch's first example (lm/summaries.py)."""
    return self._summaries(state.model, batch, rng)
