"""Masked discrete diffusion over accompaniment tokens (LaDA-Band, arXiv 2604.11052).

LaDA-Band generates an accompaniment token track by iterative unmasking
(MaskGIT / VampNet style). This module holds the pieces that are pure array
maths, so they trace under `jax.jit` for any batch size and can be tested on
their own; the model and the sampling loop live elsewhere.

Training: draw a time r in [0, 1) per sample, mask each valid token
independently with probability t = cos(pi r / 2) (`cosine_mask_ratio`,
`mask_tokens`), and score the model on the masked tokens (`masked_ce_loss`).
The released code draws r from a scrambled Sobol engine whose state persists
across steps; `sobol_r` gives the same low-discrepancy behaviour as a pure
function of (seed, step), so a resumed run draws exactly the same r.

The loss weighting is a choice (`loss_weights`): the released code uses a
plain token mean over masked tokens ('none'); the paper names a 1/t weight
('inv_t', as in LLaDA); 'elbo' is the exact continuous-time ELBO weight for
the cosine schedule, (pi/2) sqrt(1 - t^2) / t.

The optional replaced-token-detection head (ELECTRA-style) is trained with
`rtd_inputs` / `rtd_loss`.

Sampling: `num_masked_after` (how many tokens stay masked after a step),
`gumbel_scale` (annealed choice noise), `remask` (keep the least confident
still-masked positions masked, MaskGIT's mask_by_random_topk) and
`filter_logits` (top-p then top-k, as the released code).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LOSS_KINDS = ('none', 'inv_t', 'elbo')


def _check_kind(kind: str) -> None:
  if kind not in LOSS_KINDS:
    raise ValueError(f'kind must be one of {LOSS_KINDS}, got {kind!r}')


def _per_row(x: jax.Array, ndim: int) -> jax.Array:
  """[B] -> [B, 1, ..., 1] with `ndim` dims in all, to broadcast per row."""
  return jnp.reshape(x, x.shape + (1,) * (ndim - x.ndim))


# --------------------------------------------------------------------------
# Time and mask sampling.
# --------------------------------------------------------------------------


def cosine_mask_ratio(r: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Mask probability t = clip(cos(pi/2 * r), eps, 1).

  Args:
    r: times in [0, 1]; r = 0 masks everything, r = 1 (almost) nothing.
    eps: lower clip, so that t stays positive and 1/t finite (the released
      code's 1e-10).

  Returns:
    t, same shape as r, float32.
  """
  if not 0 < eps < 1:
    raise ValueError(f'eps must be in (0, 1), got {eps}')
  r = jnp.asarray(r, jnp.float32)
  return jnp.clip(jnp.cos(0.5 * jnp.pi * r), eps, 1.0)


def _bit_reverse_u32(n: jax.Array) -> jax.Array:
  """Reverses the 32 bits of a uint32 array (swap halves, bytes, nibbles...)."""
  u32 = jnp.uint32
  n = n.astype(u32)
  n = (n >> 16) | (n << 16)
  for shift, hi in ((8, 0xFF00FF00), (4, 0xF0F0F0F0), (2, 0xCCCCCCCC),
                    (1, 0xAAAAAAAA)):
    lo = 0xFFFFFFFF ^ hi
    n = ((n & u32(hi)) >> shift) | ((n & u32(lo)) << shift)
  return n


def sobol_r(step: jax.Array | int, batch: int, seed: int | jax.Array = 0
            ) -> jax.Array:
  """Quasi-random training times r in [0, 1) for one training step.

  The 1-D Sobol sequence is the base-2 van der Corput sequence
  vdc(n) = bit_reverse_32(n) / 2^32. Sample i of step s takes index
  n = s * batch + i, so consecutive steps continue one sequence (as the
  released code's persistent SobolEngine does) and any 2^m consecutive
  indices starting at a multiple of 2^m hit each interval [j/2^m, (j+1)/2^m)
  exactly once. The sequence is randomised by a Cranley-Patterson rotation:
  r = frac(vdc(n) + u_seed) with u_seed uniform from `seed`, which keeps the
  low discrepancy (each such interval still gets one point up to the wrap).
  This is equivalent in spirit to torch SobolEngine(1, scramble=True) (which
  scrambles by a random linear matrix plus digital shift instead) but is a
  pure function of (seed, step): resuming at step s draws the same r exactly.

  The rotation is done in 32-bit fixed point (addition modulo 2^32) and the
  result keeps the top 24 bits, so r is exactly representable in float32 and
  strictly below 1. Indices wrap modulo 2^32 (after 2^32 samples).

  Args:
    step: training step (int or traced int scalar).
    batch: samples per step (static int).
    seed: int or traced scalar seed for the shift.

  Returns:
    r [batch] float32 in [0, 1).
  """
  if not isinstance(batch, int) or batch < 1:
    raise ValueError(f'batch must be a positive int, got {batch!r}')
  shift = jax.random.bits(jax.random.key(seed), (), jnp.uint32)
  n = (jnp.asarray(step).astype(jnp.uint32) * jnp.uint32(batch)
       + jnp.arange(batch, dtype=jnp.uint32))
  x = _bit_reverse_u32(n) + shift          # mod 2^32: frac(vdc + u)
  return (x >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def mask_tokens(rng: jax.Array, valid: jax.Array, t: jax.Array) -> jax.Array:
  """Masks each valid token of row b independently with probability t[b].

  Args:
    rng: PRNG key.
    valid: [B, T] or [B, T, K] bool, False at padding (never masked).
    t: [B] mask probabilities.

  Returns:
    bool mask, same shape as `valid`.
  """
  if t.ndim != 1 or t.shape[0] != valid.shape[0]:
    raise ValueError(f't must have shape [B] = [{valid.shape[0]}], '
                     f'got {t.shape}')
  u = jax.random.uniform(rng, valid.shape)
  return (u < _per_row(t.astype(jnp.float32), valid.ndim)) & valid


# --------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------


def loss_weights(t: jax.Array, kind: str = 'elbo') -> jax.Array:
  """Per-sample weight w(t) of the masked-token cross entropy.

  'none': 1 (the released code; with a token mean over masked tokens each
  sample then counts in proportion to its number of masked tokens, ~ t).
  'inv_t': 1/t (LLaDA's weight, exact ELBO only for the linear schedule).
  'elbo': the exact continuous-time ELBO weight for t = cos(pi r / 2).
  With alpha(r) = 1 - t(r) the probability that a token is unmasked, the
  masked-diffusion NELBO is E_r[ -alpha'(r) / (1 - alpha(r)) *
  sum_masked CE ] up to the sign convention of the time axis (MDLM), i.e.
  |alpha'(r)| / t = (pi/2) sin(pi r / 2) / cos(pi r / 2)
                  = (pi/2) sqrt(1 - t^2) / t.
  E.g. 2.72 at t = 0.5, 0.76 at 0.9, 0.22 at 0.99 (1/t: 2.0, 1.11, 1.01).
  Since E_r[w t] = integral_0^1 (pi/2) sin(pi r/2) dr = 1, a model that is
  uniform over V gets an expected loss of log V per token, as it should.

  Args:
    t: mask probabilities (> 0), any shape.
    kind: one of LOSS_KINDS.

  Returns:
    weights, same shape as t, float32.
  """
  _check_kind(kind)
  t = jnp.asarray(t, jnp.float32)
  if kind == 'none':
    return jnp.ones_like(t)
  if kind == 'inv_t':
    return 1.0 / t
  return 0.5 * jnp.pi * jnp.sqrt(jnp.clip(1.0 - t * t, 0.0, 1.0)) / t


def masked_ce_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                   t: jax.Array, valid: jax.Array, kind: str = 'none'
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross entropy on masked tokens, weighted and normalised by `kind`.

  'none' (released code): mean CE over all masked tokens of the batch.
  'inv_t' / 'elbo' (LLaDA / MDLM): sum over masked tokens of w(t_b) * CE,
  divided by the number of valid tokens of the batch.

  Args:
    logits: [B, T, V] or [B, T, K, V].
    targets: int token ids, logits.shape[:-1].
    mask: bool, logits.shape[:-1]; True where the input was masked.
    t: [B] mask probabilities used for each row.
    valid: bool, logits.shape[:-1]; False at padding.
    kind: one of LOSS_KINDS.

  Returns:
    (loss scalar, metrics) with metrics 'masked_fraction' (masked / valid
    tokens) and 'ce_masked' (unweighted mean CE over masked tokens).
  """
  _check_kind(kind)
  if targets.shape != logits.shape[:-1]:
    raise ValueError(f'targets must have shape {logits.shape[:-1]}, '
                     f'got {targets.shape}')
  for name, x in (('mask', mask), ('valid', valid)):
    if x.shape != targets.shape:
      raise ValueError(f'{name} must have shape {targets.shape}, got {x.shape}')
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32),
                            axis=-1)[..., 0]
  m = (mask & valid).astype(jnp.float32)
  n_masked = jnp.maximum(m.sum(), 1.0)
  n_valid = jnp.maximum(valid.astype(jnp.float32).sum(), 1.0)
  ce_masked = (ce * m).sum() / n_masked
  if kind == 'none':
    loss = ce_masked
  else:
    w = _per_row(loss_weights(t, kind), ce.ndim)
    loss = (w * ce * m).sum() / n_valid
  metrics = {'masked_fraction': m.sum() / n_valid, 'ce_masked': ce_masked}
  return loss, metrics


def rtd_inputs(logits: jax.Array, targets: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Corrupted tokens and labels for replaced-token detection.

  The model's own argmax (no gradient) replaces the masked tokens; a
  position counts as replaced only where that argmax is wrong.

  Args:
    logits: [..., V] first-pass logits.
    targets: [...] original tokens.
    mask: [...] bool, positions that were masked.

  Returns:
    (replaced [...] int32, labels [...] bool = replaced != targets).
  """
  pred = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
  replaced = jnp.where(mask, pred, targets.astype(jnp.int32))
  return replaced, replaced != targets


def rtd_loss(rtd_logits: jax.Array, labels: jax.Array, valid: jax.Array
             ) -> jax.Array:
  """Mean binary cross entropy with logits over valid positions.

  Args:
    rtd_logits: [B, T] or [B, T, K] detector logits (replaced = positive).
    labels: bool, same shape.
    valid: bool, same shape; padding is excluded from the mean.

  Returns:
    scalar loss.
  """
  x = rtd_logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  bce = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  v = valid.astype(jnp.float32)
  return (bce * v).sum() / jnp.maximum(v.sum(), 1.0)


# --------------------------------------------------------------------------
# Sampler schedule.
# --------------------------------------------------------------------------


def schedule_ratios(steps: int) -> np.ndarray:
  """Masked fraction after each sampler step, [steps] float64, on the host.

  ratio[i] = cos(progress * pi / 2) with progress = (i + 1) / steps, in
  float64 in exactly this order (divide, times pi, halve), as LaDA-Band's
  released sampler builds its remask ratios with Python floats; clipped to
  [0, 1]. The order matters: for step 25 of 39 (cos(pi/3) = 1/2) this gives
  0.5000000000000001, and cos(pi / 2 * 26 / 39) 0.4999999999999999, one
  token fewer for every even total.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}')
  return np.array([min(1.0, max(0.0, math.cos((i + 1) / steps * math.pi / 2.0)))
                   for i in range(steps)], np.float64)


# num_masked_after's exact arithmetic: ratio * 2^_FRAC_BITS is an integer held
# in _R_DIGITS base-2^_DIGIT_BITS digits (int32), total in two digits.
_DIGIT_BITS, _FRAC_BITS, _R_DIGITS = 12, 84, 7
_DIGIT = 1 << _DIGIT_BITS
# Totals up to this keep floor(total * ratio) + 1 below 2^23, where every
# integer's float32 significand is even (`_floor_like_released`'s tie rule).
MAX_SCHEDULE_TOTAL = (1 << 23) - 1


def _ratio_digits(steps: int) -> np.ndarray:
  """[steps, _R_DIGITS] int32: ratio[i] * 2^84 in base-2^12 digits, least
  significant first (the last step, which leaves none masked, is zeros)."""
  table = np.zeros((steps, _R_DIGITS), np.int32)
  for i, r in enumerate(schedule_ratios(steps)[:-1]):
    num, den = float(r).as_integer_ratio()       # den is a power of two
    if (1 << _FRAC_BITS) % den:
      raise ValueError(f'steps={steps}: ratio {r!r} has bits below 2^-'
                       f'{_FRAC_BITS}; use fewer steps')
    fixed = num * ((1 << _FRAC_BITS) // den)
    for j in range(_R_DIGITS):
      table[i, j] = (fixed >> (_DIGIT_BITS * j)) & (_DIGIT - 1)
  return table


def _floor_like_released(digits: jax.Array, total: jax.Array) -> jax.Array:
  """floor(float32(float64(ratio * total))) in exact int32 arithmetic.

  The released sampler multiplies its float64 ratio by the token count as
  Python floats and floors a float32 tensor made from the product. With
  q = ratio * total (exact), I = floor(q) and u = I + 1 (< 2^23), that is
  I + 1 exactly when the double rounding reaches u:
    * float32 rounds x <= u up to u iff x >= b, b = u - g/2 with g the float32
      gap below u (2^(e-24) for u = 2^e, else 2^(e-23), e = floor(log2 u));
      at x = b the tie goes to u, whose significand is even below 2^23;
    * float64 rounds q to >= b iff q >= b - h/2, h the float64 gap below b
      (2^(e-53) for u = 2^e, else 2^(e-52)); b has <= 26 significant bits, so
      the tie there goes to b.
  So the count is I + [frac(q) >= 1 - H], H = g/2 + h/2, decided on the exact
  product: ratio * 2^84 (digits) times total (two digits) -> 9 digits, of
  which the top two are I and the rest frac(q) * 2^84.
  """
  total = jnp.asarray(total, jnp.int32)
  t = (total & (_DIGIT - 1), total >> _DIGIT_BITS)
  r = [digits[..., j] for j in range(_R_DIGITS)]
  out, carry = [], jnp.zeros_like(total)
  for j in range(_R_DIGITS + 1):               # each column < 2^25 + carry
    col = carry
    if j < _R_DIGITS:
      col = col + r[j] * t[0]
    if j >= 1:
      col = col + r[j - 1] * t[1]
    out.append(col & (_DIGIT - 1))
    carry = col >> _DIGIT_BITS
  whole = out[_R_DIGITS] + (carry << _DIGIT_BITS)  # digits 7, 8: floor(q)
  u = whole + 1
  e = jnp.frexp(u.astype(jnp.float32))[1] - 1      # floor(log2 u), exact
  pow2 = (u & (u - 1)) == 0
  # H * 2^84 = 2^(e+59) + 2^(e+30) (u = 2^e), else 2^(e+60) + 2^(e+31).
  bits = (e + jnp.where(pow2, 59, 60), e + jnp.where(pow2, 30, 31))
  carry = jnp.zeros_like(total)
  for j in range(_R_DIGITS):                   # frac * 2^84 + H * 2^84
    col = out[j] + carry
    for b in bits:
      col = col + jnp.where(b // _DIGIT_BITS == j,
                            jnp.left_shift(1, b % _DIGIT_BITS), 0)
    carry = col >> _DIGIT_BITS
  return whole + carry                          # carry: reached 2^84


def num_masked_after(step: jax.Array | int, steps: int, total: jax.Array,
                     n_masked: jax.Array) -> jax.Array:
  """Tokens left masked after sampler step `step` (0-based) of `steps`.

  n = floor(ratio[step] * total) with `schedule_ratios` (cos(pi/2 (step+1) /
  steps) in float64), counted as LaDA-Band's released sampler does: its
  float64 product made a float32 tensor, then floored. The count is exact for
  any traced total in [0, MAX_SCHEDULE_TOTAL] (`_floor_like_released`: no
  float64 on device, which TPUs lack; a float32 product is one off for some
  totals, e.g. 39 instead of 40 for 80 tokens at step 39 of 60). Before the
  last step it is clipped to [1, n_masked - 1], so every step commits at
  least one token and one stays for later (MaskGIT; a row with a single
  masked token waits for the last step); the last step leaves none.

  Args:
    step: current step (int or traced scalar), 0 <= step < steps.
    steps: number of sampler steps (static int >= 1).
    total: [B] (or scalar) tokens masked at the start.
    n_masked: [B] tokens masked before this step.

  Returns:
    [B] int32 counts, 0 <= n <= n_masked.
  """
  digits = jnp.asarray(_ratio_digits(steps))[jnp.asarray(step)]
  n_masked = jnp.asarray(n_masked, jnp.int32)
  n = _floor_like_released(digits, total)
  n = jnp.maximum(1, jnp.minimum(n_masked - 1, n))
  n = jnp.where(jnp.asarray(step) >= steps - 1, 0, n)
  return jnp.clip(n, 0, n_masked)


def gumbel_scale(step: jax.Array | int, steps: int,
                 mask_temperature: float = 10.5) -> jax.Array:
  """Choice-noise scale mask_temperature * (1 - (step + 1) / steps).

  Args:
    step: current step (0-based).
    steps: number of sampler steps (static int >= 1).
    mask_temperature: scale at the start (10.5 in LaDA-Band and VampNet);
      the noise anneals linearly to 0 at the last step.

  Returns:
    float32 scalar.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}')
  if mask_temperature < 0:
    raise ValueError(f'mask_temperature must be >= 0, got {mask_temperature}')
  return mask_temperature * (1.0 - (jnp.asarray(step, jnp.float32) + 1) / steps)


def remask(rng: jax.Array, confidence: jax.Array, still_masked: jax.Array,
           n_keep_masked: jax.Array, scale: jax.Array | float) -> jax.Array:
  """New mask: the n lowest-scoring still-masked positions of each row.

  score = log(confidence) + scale * Gumbel at masked positions and +inf at
  committed ones, so committed tokens are never re-masked (MaskGIT's
  mask_by_random_topk). Positions are ranked by a stable sort of the score
  and the first n_keep_masked[b] are kept masked; ranking (rather than
  comparing against the n-th sorted score) keeps exactly n even when scores
  tie.

  Args:
    rng: PRNG key for the Gumbel noise.
    confidence: [B, N] probability of each sampled token (> 0).
    still_masked: [B, N] bool, positions masked before this step.
    n_keep_masked: [B] ints, how many stay masked (clipped to the number of
      masked positions of the row).
    scale: Gumbel noise scale (0 = keep the least confident).

  Returns:
    [B, N] bool, a subset of `still_masked` with min(n, masked) entries per row.
  """
  if confidence.shape != still_masked.shape or confidence.ndim != 2:
    raise ValueError('confidence and still_masked must both be [B, N], got '
                     f'{confidence.shape} and {still_masked.shape}')
  noise = jax.random.gumbel(rng, confidence.shape, jnp.float32)
  score = jnp.log(confidence.astype(jnp.float32)) + scale * noise
  score = jnp.where(still_masked, score, jnp.inf)
  order = jnp.argsort(score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)          # rank of each position
  n = jnp.minimum(jnp.asarray(n_keep_masked, jnp.int32),
                  still_masked.sum(-1).astype(jnp.int32))
  return (rank < n[:, None]) & still_masked


# Bisection steps for the filtering thresholds: float32 intervals of logit
# ranges shrink to adjacent floats well within 32 halvings.
_BISECT_STEPS = 32


def _threshold(logits: jax.Array, measure, target) -> jax.Array:
  """The largest logit value v with measure(logits >= v) >= target, per row.

  Bisection keeps measure(>= lo) >= target > measure(>= hi); the result is
  snapped to the smallest logit >= lo, so it is an exact element value (a
  sort would give the same cut, at ~10-30x the cost on XLA:CPU for V = 256).
  """
  finite = jnp.isfinite(logits)
  lo = jnp.min(jnp.where(finite, logits, jnp.inf), -1, keepdims=True)
  hi = jnp.max(jnp.where(finite, logits, -jnp.inf), -1, keepdims=True)
  hi = hi + jnp.maximum(jnp.abs(hi), 1.0)          # strictly above the max

  def body(_, c):
    lo, hi = c
    mid = 0.5 * (lo + hi)
    ok = measure(logits >= mid) >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, body, (lo, hi))
  return jnp.min(jnp.where(logits >= lo, logits, jnp.inf), -1, keepdims=True)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0
                  ) -> jax.Array:
  """Top-p then top-k filtering (the released code's order); -inf elsewhere.

  Top-p keeps the smallest set of most likely tokens whose probability
  reaches top_p (a token is kept while the mass before it is < top_p);
  top-k then keeps the k largest of those. Both sets are prefixes of the
  descending order, so the result is the shorter prefix: the cut is the
  larger of the two thresholds (`_threshold`: the k-th largest logit, and the
  largest logit whose at-or-above mass reaches top_p). Tokens tied with the
  last kept one are kept too.

  Args:
    logits: [..., V].
    top_k: keep this many (static int; 0 = off).
    top_p: nucleus mass in (0, 1] (1.0 = off).

  Returns:
    filtered logits, same shape.
  """
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f'top_k must be an int >= 0, got {top_k!r}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  vocab = logits.shape[-1]
  k_on = top_k not in (0, vocab) and top_k < vocab
  if not k_on and top_p == 1.0:
    return logits
  cut = jnp.full(logits.shape[:-1] + (1,), -jnp.inf, logits.dtype)
  if k_on:
    count = lambda m: jnp.sum(m, -1, keepdims=True)
    cut = jnp.maximum(cut, _threshold(logits, count, top_k))
  if top_p < 1.0:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    mass = lambda m: jnp.sum(jnp.where(m, probs, 0.0), -1, keepdims=True)
    cut = jnp.maximum(cut, _threshold(logits, mass, top_p).astype(cut.dtype))
  return jnp.where(logits >= cut, logits, -jnp.inf)
