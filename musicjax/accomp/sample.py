"""Full-song accompaniment sampling in one compiled loop (seed 003 §4).

From all-MASK to all-committed in `steps` iterations of a `lax.fori_loop`:
each step predicts every accompaniment token (frame x codebook), samples the
masked ones (top-p then top-k, temperature; `token_logits`), and keeps the
most confident; the rest are re-masked by confidence plus Gumbel noise whose
scale anneals linearly to zero. Committed tokens stay committed. Optional
classifier-free guidance over the prefix doubles the batch (rows [0, n) with
the given prefix, rows [n, 2n) with the learned nulls): u + scale * (c - u).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from musicjax.accomp import diffusion
from musicjax.accomp import model as model_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  steps: int = 60
  temperature: float = 1.0
  top_k: int = 100
  top_p: float = 0.9
  mask_temperature: float = 10.5
  cfg_scale: float = 1.0      # 1.0 = no guidance
  # True: top-p / top-k cut the raw (guided) logits and the kept ones are
  # divided by the temperature, as the released LaDA-Band sampler; False:
  # divide first, then cut (the usual LM order). Same result at temperature 1.
  temperature_after_filter: bool = True

  def validate(self) -> None:
    if self.steps < 1:
      raise ValueError(f'steps must be >= 1, got {self.steps}')
    if self.temperature <= 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}')


def sampling_from_config(s) -> Sampling:
  """`Sampling` from config.sample."""
  return Sampling(steps=int(s.steps), temperature=float(s.temperature),
                  top_k=int(s.top_k), top_p=float(s.top_p),
                  mask_temperature=float(s.mask_temperature),
                  cfg_scale=float(s.cfg_scale),
                  temperature_after_filter=bool(s.temperature_after_filter))


def prefix_of(model: model_lib.AccompModel, batch, use_text, use_ref):
  """The model's [text, reference] prefix for a batch; use_text/use_ref [B]
  pick the real condition or its learned null per row."""
  text = batch['text']
  return model.prefix(text, jnp.any(text >= 0, axis=1), batch['ref'],
                      batch['ref_valid'], use_text, use_ref)


def token_logits(logits: jax.Array, s: Sampling) -> jax.Array:
  """The logits tokens are drawn from (and their confidence read off):
  temperature and top-p then top-k, in the order `s.temperature_after_filter`
  names. With the temperature after the cut, a temperature > 1 flattens only
  the nucleus of the unscaled distribution; before it, the nucleus itself
  grows."""
  if s.temperature_after_filter:
    return diffusion.filter_logits(logits, s.top_k, s.top_p) / s.temperature
  return diffusion.filter_logits(logits / s.temperature, s.top_k, s.top_p)


def accompany(model: model_lib.AccompModel, vocal: jax.Array, valid: jax.Array,
              prefix: jax.Array, rng: jax.Array, s: Sampling,
              null_prefix: jax.Array | None = None, trace: bool = False,
              known: jax.Array | None = None,
              callback: Callable[[jax.Array], None] | None = None):
  """Accompaniment codes [B, T, K] for vocal codes [B, T, K] (traceable).

  `prefix` [B, 2, D] from `model.prefix`; `null_prefix` [B, 2, D] (the learned
  nulls) turns on guidance: the batch is doubled with unconditional rows and
  the logits are guided with `s.cfg_scale`. Invalid frames stay PAD.
  `known` [B, T, K]: tokens already decided (>= 0; e.g. the overlap with the
  previous window of a long song) start committed and are kept; the schedule
  runs over the rest. With `trace`, also returns the tokens after every step
  [steps, B, T, K]. `callback(step)` runs on the host after every step
  (progress lines).
  """
  s.validate()  # temperature 0 would divide the logits by zero
  b, t, k = vocal.shape
  v = model.codebook_size
  mask_tok, pad_tok = model_lib.mask_id(v), model_lib.pad_id(v)
  cfg = null_prefix is not None
  token_valid = jnp.broadcast_to(valid[..., None], (b, t, k))
  x0 = jnp.where(token_valid, mask_tok, pad_tok).astype(jnp.int32)
  if known is not None:
    x0 = jnp.where(token_valid & (known >= 0), known.astype(jnp.int32), x0)
  total = jnp.sum((x0 == mask_tok).reshape(b, -1), axis=1)

  def logits_of(x):
    if not cfg:
      return model.logits(model.hidden(vocal, x, valid, prefix))
    both = model.hidden(jnp.concatenate([vocal, vocal]), jnp.concatenate([x, x]),
                        jnp.concatenate([valid, valid]),
                        jnp.concatenate([prefix, null_prefix]))
    lg = model.logits(both)
    cond, uncond = lg[:b], lg[b:]
    return uncond + s.cfg_scale * (cond - uncond)

  def step(i, x):
    r_sample, r_mask = jax.random.split(jax.random.fold_in(rng, i))
    masked = x == mask_tok
    lg = token_logits(logits_of(x), s)
    sampled = jax.random.categorical(r_sample, lg, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(lg, axis=-1)
    conf = jnp.take_along_axis(probs, sampled[..., None], -1)[..., 0]
    tokens = jnp.where(masked, sampled, x)
    n_masked = jnp.sum(masked.reshape(b, -1), axis=1)
    keep = diffusion.num_masked_after(i, s.steps, total, n_masked)
    new_mask = diffusion.remask(
        r_mask, jnp.maximum(conf, 1e-30).reshape(b, -1), masked.reshape(b, -1),
        keep, diffusion.gumbel_scale(i, s.steps, s.mask_temperature))
    if callback is not None:
      jax.debug.callback(callback, i)
    return jnp.where(new_mask.reshape(b, t, k), mask_tok, tokens)

  if trace:
    def scan_step(x, i):
      y = step(i, x)
      return y, y
    out, states = jax.lax.scan(scan_step, x0, jnp.arange(s.steps))
    return out, states
  return jax.lax.fori_loop(0, s.steps, step, x0)


def accompany_ar(model: model_lib.AccompModel, vocal: jax.Array, valid: jax.Array,
                 prefix: jax.Array, rng: jax.Array, s: Sampling,
                 null_prefix: jax.Array | None = None):
  """The 'ar' ablation's decoding: frame by frame, left to right.

  Each of the T steps runs the causal model over the whole window (no key/
  value cache: this path exists to compare quality, not speed) and samples
  frame i's K codes from its logits with the same temperature / top-p /
  top-k filtering and guidance as the diffusion sampler.
  """
  s.validate()  # temperature 0 would divide the logits by zero
  b, t, k = vocal.shape
  v = model.codebook_size
  pad_tok, bos = model_lib.pad_id(v), model_lib.mask_id(v)
  cfg = null_prefix is not None
  token_valid = jnp.broadcast_to(valid[..., None], (b, t, k))

  def logits_of(x):
    inp = jnp.concatenate([jnp.full_like(x[:, :1], bos), x[:, :-1]], axis=1)
    if not cfg:
      return model.logits(model.hidden(vocal, inp, valid, prefix))
    both = model.logits(model.hidden(
        jnp.concatenate([vocal, vocal]), jnp.concatenate([inp, inp]),
        jnp.concatenate([valid, valid]), jnp.concatenate([prefix, null_prefix])))
    return both[b:] + s.cfg_scale * (both[:b] - both[b:])

  def step(i, x):
    lg = jax.lax.dynamic_index_in_dim(logits_of(x), i, 1, keepdims=False)
    lg = token_logits(lg, s)
    frame = jax.random.categorical(jax.random.fold_in(rng, i), lg, axis=-1)
    return jax.lax.dynamic_update_index_in_dim(x, frame.astype(jnp.int32), i, 1)

  x0 = jnp.full((b, t, k), pad_tok, jnp.int32)
  out = jax.lax.fori_loop(0, t, step, x0)
  return jnp.where(token_valid, out, pad_tok)
