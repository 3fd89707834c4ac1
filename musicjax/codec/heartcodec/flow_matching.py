"""Euler sampler of HeartCodec's flow-matching decoder, one window.

The latent flows from noise (t = 0) to data (t = 1) along the estimator's
velocity, in `num_steps` Euler steps compiled as one `lax.fori_loop`. With
guidance > 1 every step runs the estimator on a doubled batch, unconditional
(code features zeroed) and conditional, and extrapolates:
v = v_u + guidance * (v_c - v_u).

In-context prefix: the first `prefix_len` frames are known (the overlap with
the previous window). Before each step they are reset onto the straight path
from their noise to the known latent, (1 - (1 - sigma_min) t) x0 + t x1, and
the known latent is also an estimator input (zero past the prefix); at the
end they are the known latent exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from musicjax.codec.heartcodec.estimator import FlowEstimator


def time_grid(num_steps: int) -> np.ndarray:
  """num_steps + 1 float32 times from 0 to 1, each half counted from its own
  end (as torch.linspace computes them: 0.7 is 1 - 3 * 0.1, not 7 * 0.1)."""
  n = num_steps + 1
  step = np.float32(1.0) / np.float32(num_steps)
  i = np.arange(n)
  lo = step * i.astype(np.float32)
  hi = np.float32(1.0) - step * (n - 1 - i).astype(np.float32)
  return np.where(i < n // 2, lo, hi).astype(np.float32)


def sample(estimator: FlowEstimator, features: jax.Array, noise: jax.Array,
           known: jax.Array, prefix_len: jax.Array, *, num_steps: int,
           guidance_scale: float, sigma_min: float) -> jax.Array:
  """Latent [B, T, C] of one window.

  Args:
    estimator: the velocity model.
    features: code features [B, T, dim].
    noise: the initial latent [B, T, C].
    known: latent whose first `prefix_len` frames are kept [B, T, C].
    prefix_len: int32 scalar, may be traced (one compile for every window).
    num_steps, guidance_scale, sigma_min: config.flow.
  """
  t_frames = noise.shape[1]
  in_prefix = (jnp.arange(t_frames) < prefix_len)[None, :, None]
  context = jnp.where(in_prefix, known, 0.0).astype(noise.dtype)
  grid = jnp.asarray(time_grid(num_steps))
  keep = np.float32(1.0 - sigma_min)
  guided = guidance_scale > 1.0
  if guided:
    const = jnp.concatenate([
        jnp.concatenate([context, context], 0),
        jnp.concatenate([jnp.zeros_like(features), features], 0)], -1)
  else:
    const = jnp.concatenate([context, features], -1)

  def step(i, carry):
    x, t, dt = carry
    x = jnp.where(in_prefix, (1 - keep * t) * noise + t * context, x)
    if guided:
      inp = jnp.concatenate([jnp.concatenate([x, x], 0), const], -1)
      v = estimator(inp, jnp.full((inp.shape[0],), t))
      v_u, v_c = jnp.split(v, 2, axis=0)
      v = v_u + guidance_scale * (v_c - v_u)
    else:
      v = estimator(jnp.concatenate([x, const], -1), jnp.full((x.shape[0],), t))
    x = x + dt * v
    # Times accumulate as heartlib's loop does: t += dt, then dt is the gap
    # from that sum to the next grid time.
    t = t + dt
    dt = jnp.where(i + 1 < num_steps,
                   grid[jnp.minimum(i + 2, num_steps)] - t, dt)
    return x, t, dt

  x, _, _ = jax.lax.fori_loop(0, num_steps, step,
                              (noise, grid[0], grid[1] - grid[0]))
  return jnp.where(in_prefix, context, x)
