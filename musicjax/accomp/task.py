"""LaDA-Band vocal-to-accompaniment as a trainer task (seed 003 §3-4).

One train step (the default 'diffusion' model):
  1. time r from a Cranley-Patterson-rotated Sobol sequence indexed by the
     step counter (`diffusion.sobol_r`: low-discrepancy over consecutive
     steps, and a resumed run draws the same r), mask ratio t = cos(pi r / 2);
  2. every valid accompaniment token (frame x codebook) masked independently
     with probability t; the vocal track is always visible;
  3. the two prefix tokens [text, reference] each replaced by its learned null
     with probability `cond.drop_text` / `cond.drop_reference` (classifier-free
     conditioning dropout, drawn on device from the step rng);
  4. masked-modeling loss with the `loss.weighting` of `diffusion.masked_ce_loss`;
  5. replaced-token detection: the masked positions are filled with the
     first pass's argmax, a second forward of the same backbone (with
     gradient, unless `loss.rtd_backbone_grad` is off as in the released
     code) feeds the detector head, loss weight `loss.rtd_weight`.
The 'ar' model (the seed's table-3 ablation) is a causal model over the same
frames, trained with next-frame cross entropy on every token; it has no RTD.

Stage 2 of the curriculum (`init.workdir`) starts from a stage-1 run's
weights (fresh optimizer), see configs/accomp/.
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

from musicjax.accomp import data as data_lib
from musicjax.accomp import diffusion
from musicjax.accomp import model as model_lib
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import summaries as summaries_lib
from musicjax.accomp import synthetic
from musicjax.config import ConfigError
from musicjax.lm import task as lm_task
from musicjax.nn import lora
from musicjax.nn import transformer
from musicjax.parallel import rules
from musicjax.train import accumulate
from musicjax.train.task import ArraySpec, Task

ConfigDict = ml_collections.ConfigDict

SYNTHETIC_TASKS = ('pair', 'chain')   # musicjax/accomp/synthetic.py

# Model keys that may differ from the stage-1 run: they change neither the
# parameters' shapes nor the function they compute.
_FREE_MODEL_KEYS = ('embed_init_std', 'backbone.init_std', 'backbone.dtype',
                    'backbone.scan_layers', 'backbone.remat',
                    'backbone.attention_chunk')


def default_config() -> ConfigDict:
  """Every accompaniment-model number; defaults are the tiny scale."""
  c = ConfigDict()
  c.model = model_lib.default_config()
  c.data = data_lib.default_data_config()
  # data.kind: 'tokens' (musicjax prepare --stems) | 'synthetic' (tests).
  c.data.synthetic_min_frames = 1   # synthetic: shortest example (padding)
  c.data.synthetic_task = 'pair'    # synthetic: 'pair' | 'chain' (synthetic.py)

  lm = lm_task.default_config()
  cd = c.cond = ConfigDict()
  cd.tag_probs = lm.cond.tag_probs     # tags kept per category (seed 001 table 6)
  cd.extra_tag_prob = lm.cond.extra_tag_prob
  cd.drop_text = 0.5                   # prefix dropout (seed 003 stage 2: 0.5 each)
  cd.drop_reference = 0.5

  lo = c.loss = ConfigDict()
  # none (released code: mean CE over masked tokens) | inv_t (paper eq. 3) |
  # elbo (exact weight for the cosine schedule); the default is from the
  # experiment in docs/figures.md ("Loss weighting").
  lo.weighting = 'none'
  lo.rtd_weight = 0.2                  # seed 003 eq. 4 (0 = no RTD, an ablation)
  lo.rtd_backbone_grad = True          # False = the released code (head only)
  lo.mask_eps = 1e-10                  # t is clipped to [eps, 1]
  lo.sobol_seed = 0                    # rotation of the Sobol time sequence

  c.optim = lm.optim
  c.optim.b2 = 0.999                   # the released s1/s2 configs
  c.optim.weight_decay = 0.01

  s = c.sample = ConfigDict()
  s.steps = 60
  # Weight-only quantized inference (`accompany`): the backbone's attention
  # and MLP weights as int8 / int4 (qwix; nn/lora.py), dequantized where read.
  s.weights = 'float'                  # float | bfloat16 | int8 | int4
  s.temperature = 1.0
  s.top_k = 100
  s.top_p = 0.9
  # True: top-p / top-k cut the raw logits, then the temperature divides them
  # (the released code's order); False: temperature first, then the cut.
  s.temperature_after_filter = True
  s.mask_temperature = 10.5
  s.cfg_scale = 1.0                    # 1.0 = no guidance (the released code)
  # Long songs (musicjax/accomp/song.py): 0 = the whole song in one pass;
  # else windows of this many frames, each overlapping the previous one by
  # overlap_frames (those start committed to the previous window's tokens).
  s.window_frames = 0
  s.overlap_frames = 0

  # TensorBoard summaries at eval steps (musicjax/accomp/summaries.py): the
  # first eval example's vocal accompanied with the sample settings above,
  # beside its real accompaniment, decoded with the token set's codec.
  su = c.summary = ConfigDict()
  su.seconds = 4.0                     # clip length, at most data.max_frames (0 = none)
  return c


def check_config(config: ConfigDict) -> None:
  m = config.model
  if m.decode not in model_lib.DECODE_MODES:
    raise ConfigError(f'config.model.decode must be one of '
                      f'{model_lib.DECODE_MODES}, got {m.decode!r}')
  if m.num_codebooks < 1 or m.codebook_size < 2:
    raise ConfigError('config.model.num_codebooks must be >= 1 and '
                      'codebook_size >= 2')
  if m.backbone.dim % 2:
    raise ConfigError(f'config.model.backbone.dim={m.backbone.dim} must be '
                      'even: the vocal and accompaniment tracks get dim/2 each')
  transformer.check_config(m.backbone, 'model.backbone')
  if config.sample.weights not in lora.SERVING:
    raise ConfigError(f'config.sample.weights must be one of {lora.SERVING}, '
                      f'got {config.sample.weights!r}')
  lo = config.loss
  if lo.weighting not in diffusion.LOSS_KINDS:
    raise ConfigError(f'config.loss.weighting must be one of '
                      f'{diffusion.LOSS_KINDS}, got {lo.weighting!r}')
  if lo.rtd_weight < 0:
    raise ConfigError(f'config.loss.rtd_weight must be >= 0, got {lo.rtd_weight}')
  if m.decode == 'ar' and lo.rtd_weight:
    raise ConfigError("config.loss.rtd_weight must be 0 with model.decode='ar' "
                      '(the autoregressive ablation has no masked positions to '
                      'detect); set --config.loss.rtd_weight=0')
  if not 0 < lo.mask_eps < 1:
    raise ConfigError(f'config.loss.mask_eps must be in (0, 1), got {lo.mask_eps}')
  for key in ('drop_text', 'drop_reference'):
    if not 0 <= config.cond[key] <= 1:
      raise ConfigError(f'config.cond.{key} must be in [0, 1], got '
                        f'{config.cond[key]}')
  if config.data.max_frames < 1:
    raise ConfigError('config.data.max_frames must be >= 1')
  if config.summary.seconds < 0:
    raise ConfigError('config.summary.seconds must be >= 0 (0 = no '
                      f'summaries), got {config.summary.seconds}')
  if config.data.kind not in ('tokens', 'synthetic'):
    raise ConfigError("config.data.kind must be 'tokens' (musicjax prepare "
                      "--stems) or 'synthetic' for the accomp task, got "
                      f'{config.data.kind!r}')
  if config.data.synthetic_task not in SYNTHETIC_TASKS:
    raise ConfigError(f'config.data.synthetic_task must be one of '
                      f'{SYNTHETIC_TASKS}, got {config.data.synthetic_task!r}')
  sample_lib.sampling_from_config(config.sample).validate()



def trainable(config: ConfigDict):
  """The adapters of a LoRA run (config.lora), else every weight."""
  return nnx.LoRAParam if lora.enabled(config) else nnx.Param


class AccompState(nnx.Module):

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    self.model = model_lib.AccompModel(config.model, rngs)
    if lora.enabled(config):
      lora.apply(self.model, config, rngs)
    self.opt = nnx.Optimizer(self.model, lm_task.make_optimizer(
        config.optim, config.train.steps), wrt=trainable(config))
    self.step = lm_task.StepCounter(jnp.zeros((), jnp.int32))


def token_valid(batch) -> jax.Array:
  """[B, T, K] bool: frames of the window (and codes present)."""
  return batch['valid'][..., None] & (batch['accomp'] >= 0)



def shift_right(accomp: jax.Array, bos: int) -> jax.Array:
  """The 'ar' input: frame t sees the accompaniment of frame t - 1 (BOS first)."""
  first = jnp.full_like(accomp[:, :1], bos)
  return jnp.concatenate([first, accomp[:, :-1]], axis=1)


def per_codebook_ce(logits, targets, mask) -> dict[str, jax.Array]:
  """'ce/k': mean cross entropy over the masked tokens of codebook k (the
  coarse codebook carries the harmony; fine ones are closer to noise)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  m = mask.astype(jnp.float32)
  num = jnp.sum(ce * m, axis=(0, 1))
  den = jnp.maximum(jnp.sum(m, axis=(0, 1)), 1.0)
  return {f'ce/{k}': num[k] / den[k] for k in range(logits.shape[2])}


def diffusion_loss(model: model_lib.AccompModel, batch, step, rng, lo: ConfigDict,
                   use_text, use_ref) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MLM (+ RTD) loss of one batch; `step` indexes the Sobol times."""
  accomp, vocal, valid = batch['accomp'], batch['vocal'], batch['valid']
  b = accomp.shape[0]
  v = model.codebook_size
  tv = token_valid(batch)
  t = diffusion.cosine_mask_ratio(
      diffusion.sobol_r(step, b, int(lo.sobol_seed)), float(lo.mask_eps))
  mask = diffusion.mask_tokens(rng, tv, t)
  pad = model_lib.pad_id(v)
  clean = jnp.where(tv, accomp, pad)
  inp = jnp.where(mask, model_lib.mask_id(v), clean)
  prefix = sample_lib.prefix_of(model, batch, use_text, use_ref)
  logits = model.logits(model.hidden(vocal, inp, valid, prefix))
  mlm, m = diffusion.masked_ce_loss(logits, clean, mask, t, tv, lo.weighting)
  hit = (jnp.argmax(logits, -1) == clean) & mask
  metrics = per_codebook_ce(logits, clean, mask)
  metrics.update({'mlm': mlm, 'ce_masked': m['ce_masked'],
             'masked_fraction': m['masked_fraction'],
             'acc_masked': hit.sum() / jnp.maximum(mask.sum(), 1),
             't_mean': jnp.mean(t)})
  loss = mlm
  if lo.rtd_weight:
    replaced, labels = diffusion.rtd_inputs(logits, clean, mask)
    h2 = model.hidden(vocal, jnp.where(tv, replaced, pad), valid, prefix)
    if not lo.rtd_backbone_grad:
      h2 = jax.lax.stop_gradient(h2)
    rl = model.rtd_logits(h2)
    rtd = diffusion.rtd_loss(rl, labels, tv)
    loss = loss + lo.rtd_weight * rtd
    metrics['rtd'] = rtd
    metrics['rtd_acc'] = jnp.sum(((rl > 0) == labels) & tv) / jnp.maximum(
        tv.sum(), 1)
    metrics['replaced_fraction'] = jnp.sum(labels & tv) / jnp.maximum(tv.sum(), 1)
  metrics['loss'] = loss
  return loss, metrics


def ar_loss(model: model_lib.AccompModel, batch, use_text, use_ref):
  """Next-frame cross entropy on every valid token (the 'ar' ablation)."""
  v = model.codebook_size
  tv = token_valid(batch)
  clean = jnp.where(tv, batch['accomp'], model_lib.pad_id(v))
  inp = shift_right(clean, model_lib.mask_id(v))
  prefix = sample_lib.prefix_of(model, batch, use_text, use_ref)
  logits = model.logits(model.hidden(batch['vocal'], inp, batch['valid'], prefix))
  ones = jnp.ones(clean.shape[:1], jnp.float32)
  ce, _ = diffusion.masked_ce_loss(logits, clean, tv, ones, tv, 'none')
  hit = (jnp.argmax(logits, -1) == clean) & tv
  metrics = per_codebook_ce(logits, clean, tv)
  metrics.update({'loss': ce, 'ce': ce,
                  'acc': hit.sum() / jnp.maximum(tv.sum(), 1)})
  return ce, metrics


# ------------------------------------------------ gradient accumulation
# The losses above as sums over the batch's rows (musicjax/train/accumulate.py):
# the step's randomness is drawn for the whole batch first and split with it,
# so micro-batches see the masks and conditions the whole batch would.


def step_draws(batch, step, rng, config: ConfigDict) -> dict[str, jax.Array]:
  """Per-row draws of one train step: mask times 't' [B], 'mask' [B, T, K],
  'use_text' / 'use_ref' [B]; the same as `AccompTask.train_step`'s."""
  cd, lo = config.cond, config.loss
  b = batch['valid'].shape[0]
  r_mask, r_text, r_ref = jax.random.split(rng, 3)
  out = {'use_text': jax.random.uniform(r_text, (b,)) >= cd.drop_text,
         'use_ref': jax.random.uniform(r_ref, (b,)) >= cd.drop_reference}
  if config.model.decode == 'ar':
    out['t'] = jnp.ones((b,), jnp.float32)
    out['mask'] = token_valid(batch)
  else:
    out['t'] = diffusion.cosine_mask_ratio(
        diffusion.sobol_r(step, b, int(lo.sobol_seed)), float(lo.mask_eps))
    out['mask'] = diffusion.mask_tokens(r_mask, token_valid(batch), out['t'])
  return out


def loss_sums(model: model_lib.AccompModel, batch, lo: ConfigDict,
              decode: str) -> dict[str, jax.Array]:
  """Sums over the rows of `batch` (with `step_draws`' keys) of the loss
  terms and their counts; `loss_from_sums` turns them into the loss."""
  v = model.codebook_size
  tv = token_valid(batch)
  mask = batch['mask']
  pad = model_lib.pad_id(v)
  clean = jnp.where(tv, batch['accomp'], pad)
  if decode == 'ar':
    inp = shift_right(clean, model_lib.mask_id(v))
  else:
    inp = jnp.where(mask, model_lib.mask_id(v), clean)
  prefix = sample_lib.prefix_of(model, batch, batch['use_text'], batch['use_ref'])
  vocal, valid = batch['vocal'], batch['valid']
  logits = model.logits(model.hidden(vocal, inp, valid, prefix))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  ce = -jnp.take_along_axis(logp, clean[..., None], -1)[..., 0]
  m = (mask & tv).astype(jnp.float32)
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))
  out = {'ce': jnp.sum(ce * m), 'masked': jnp.sum(m), 'valid': f32(tv),
         'ce_k': jnp.sum(ce * m, axis=(0, 1)), 'masked_k': jnp.sum(m, axis=(0, 1)),
         'hit': f32((jnp.argmax(logits, -1) == clean) & mask),
         'mask_count': f32(mask), 't': jnp.sum(batch['t']),
         'rows': f32(jnp.ones_like(batch['t']))}
  if lo.weighting != 'none':
    w = diffusion.loss_weights(batch['t'], lo.weighting)[:, None, None]
    out['weighted_ce'] = jnp.sum(w * ce * m)
  if decode != 'ar' and lo.rtd_weight:
    replaced, labels = diffusion.rtd_inputs(logits, clean, mask)
    h2 = model.hidden(vocal, jnp.where(tv, replaced, pad), valid, prefix)
    if not lo.rtd_backbone_grad:
      h2 = jax.lax.stop_gradient(h2)
    rl = model.rtd_logits(h2)
    x, y = rl.astype(jnp.float32), labels.astype(jnp.float32)
    bce = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    out['rtd'] = jnp.sum(bce * tv)
    out['rtd_hit'] = f32(((rl > 0) == labels) & tv)
    out['replaced'] = f32(labels & tv)
  return out


# Sums that do not depend on the parameters (accumulate.value_and_grad).
COUNT_SUMS = ('masked', 'valid', 'masked_k', 'mask_count', 'rows')


def loss_from_sums(s: Mapping[str, jax.Array], lo: ConfigDict, decode: str):
  """(loss, metrics) of `diffusion_loss` / `ar_loss` from the batch's sums."""
  per = lambda a, n: a / jnp.maximum(n, 1.0)
  ce_masked = per(s['ce'], s['masked'])
  metrics = {f'ce/{k}': per(s['ce_k'][k], s['masked_k'][k])
             for k in range(s['ce_k'].shape[0])}
  if decode == 'ar':
    metrics.update({'loss': ce_masked, 'ce': ce_masked,
                    'acc': per(s['hit'], s['mask_count'])})
    return ce_masked, metrics
  mlm = ce_masked if lo.weighting == 'none' else per(s['weighted_ce'], s['valid'])
  metrics.update({'mlm': mlm, 'ce_masked': ce_masked,
                  'masked_fraction': per(s['masked'], s['valid']),
                  'acc_masked': per(s['hit'], s['mask_count']),
                  't_mean': s['t'] / s['rows']})
  loss = mlm
  if lo.rtd_weight:
    rtd = per(s['rtd'], s['valid'])
    loss = loss + lo.rtd_weight * rtd
    metrics.update({'rtd': rtd, 'rtd_acc': per(s['rtd_hit'], s['valid']),
                    'replaced_fraction': per(s['replaced'], s['valid'])})
  metrics['loss'] = loss
  return loss, metrics


class AccompTask(Task):
  name = 'accomp'
  progress_metrics = ('loss', 'ce_masked', 'ce/0', 'rtd')
  free_model_keys = _FREE_MODEL_KEYS   # stage 2 warm-starts from stage 1
  supports_grad_accum = True
  supports_lora = True

  @classmethod
  def default_config(cls) -> ConfigDict:
    return default_config()

  def __init__(self, config: ConfigDict):
    super().__init__(config)
    check_config(config)
    if config.model.decode == 'ar':
      self.progress_metrics = ('loss', 'acc', 'ce/0')

  def create_state(self, rngs: nnx.Rngs) -> AccompState:
    return AccompState(self.config, rngs)

  def inference_model(self, state: AccompState) -> model_lib.AccompModel:
    return state.model

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    d, k = self.config.data, self.config.model.num_codebooks
    t, r = d.max_frames, max(d.reference_frames, 1)
    return {
        'vocal': ArraySpec((batch_size, t, k), np.int32, ('batch', 'time', None)),
        'accomp': ArraySpec((batch_size, t, k), np.int32, ('batch', 'time', None)),
        'valid': ArraySpec((batch_size, t), bool, ('batch', 'time')),
        'text': ArraySpec((batch_size, d.max_text_tokens), np.int32,
                          ('batch', None)),
        'ref': ArraySpec((batch_size, r, k), np.int32, ('batch', None, None)),
        'ref_valid': ArraySpec((batch_size,), bool, ('batch',)),
    }

  def _loss(self, model, batch, step, rng, use_text, use_ref):
    if self.config.model.decode == 'ar':
      return ar_loss(model, batch, use_text, use_ref)
    return diffusion_loss(model, batch, step, rng, self.config.loss,
                          use_text, use_ref)

  def train_step(self, state: AccompState, batch, rng):
    cd = self.config.cond
    b = batch['valid'].shape[0]
    r_mask, r_text, r_ref = jax.random.split(rng, 3)
    use_text = jax.random.uniform(r_text, (b,)) >= cd.drop_text
    use_ref = jax.random.uniform(r_ref, (b,)) >= cd.drop_reference
    step = state.step[...]
    gdef, params, rest = nnx.split(state.model, trainable(self.config), ...)
    n = int(self.config.train.grad_accum)
    if n == 1:
      def loss_fn(p):
        return self._loss(nnx.merge(gdef, p, rest), batch, step, r_mask,
                          use_text, use_ref)

      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
      lo, decode = self.config.loss, self.config.model.decode
      full = dict(batch, **step_draws(batch, step, rng, self.config))
      axes = {k: v.logical_axes for k, v in
              self.batch_spec(self.config.data.batch_size).items()}
      axes['mask'] = axes['accomp']
      _, metrics, grads = accumulate.value_and_grad(
          lambda p, mb: loss_sums(nnx.merge(gdef, p, rest), mb, lo, decode),
          lambda sums: loss_from_sums(sums, lo, decode), params, full, n,
          counts=COUNT_SUMS, logical_axes=axes)
    state.opt.update(state.model, grads)
    state.step[...] = step + 1
    metrics['optim/grad_norm'] = optax.tree.norm(grads)
    return metrics

  def eval_step(self, state: AccompState, batch, rng):
    # Every condition kept; the Sobol times of step 0 stratify t over the batch,
    # so the eval loss covers the whole schedule the same way every time.
    b = batch['valid'].shape[0]
    keep = jnp.ones((b,), bool)
    _, metrics = self._loss(state.model, batch, jnp.int32(0), rng, keep, keep)
    # Does the model listen to the vocal? The same windows, masks and prefix
    # with each row given another row's vocal: the loss rises by `vocal_gain`
    # nats when it does (0 for a model that ignores the vocal, or batch 1).
    # (The roll runs on the gathered batch: an Explicit mesh refuses to roll
    # a sharded axis.)
    whole = rules.shard_activation(batch['vocal'], (None,) * batch['vocal'].ndim)
    other = dict(batch, vocal=rules.shard_activation(
        jnp.roll(whole, 1, axis=0), ('batch',) + (None,) * (whole.ndim - 1)))
    _, swapped = self._loss(state.model, other, jnp.int32(0), rng, keep, keep)
    key = 'ce_masked' if 'ce_masked' in metrics else 'loss'
    metrics['ce_other_vocal'] = swapped[key]
    metrics['vocal_gain'] = swapped[key] - metrics[key]
    return metrics

  @functools.cached_property
  def _summaries(self):
    # Built on first use: the codec and the jitted sampler are kept for the run.
    return summaries_lib.AccompSummaries(self.config)

  def summaries(self, state: AccompState, batch, rng):
    """The first eval vocal accompanied, beside its real accompaniment
    (accomp/summaries.py)."""
    return self._summaries(state.model, batch, rng)

  def dataset(self, split: str, shard_index: int, shard_count: int):
    if self.config.data.kind == 'synthetic':
      return synthetic.synthetic_dataset(self.config, split, shard_index,
                                         shard_count)
    return data_lib.accomp_dataset(self.config, split, shard_index, shard_count)
