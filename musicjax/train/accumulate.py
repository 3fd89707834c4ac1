"""Exact gradient accumulation: one step's batch as `n` micro-batches.

Only one micro-batch's activations are live at a time (a `lax.scan`), and the
step gets the whole batch's loss, metrics and gradient: not the mean of the
micro-batches' losses, which differs whenever the loss divides by a count that
varies between micro-batches (the LM's tokens per codebook).

A task writes its loss as `finish(S)` of sums S over the batch's rows:
`sums(params, batch)` returns a dict of arrays, each a sum over the rows of
`batch`, so the batch's S is the sum of its micro-batches'. The sums named in
`counts` must not depend on the params (token counts), and `finish` must be
linear in the other sums once the counts are fixed, as every mean of sums is
(L = Σ_k λ_k N_k / D_k). Then ∂L/∂S depends on the counts alone, and

  ∂L/∂θ = Σ_i vjp(sums(·, micro_i))(∂L/∂S),

one forward and one backward pass per micro-batch. The counts are added up
first by a scan whose forward pass nothing reads (XLA removes it).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from musicjax.parallel import rules

Sums = dict[str, jax.Array]


def _rows_to_micro(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [B/n, n, ...], the batch dim keeping its sharding."""
  shape = (x.shape[0] // n, n) + x.shape[1:]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not all(
      t == AxisType.Explicit for t in mesh.axis_types):
    return x.reshape(shape)
  spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
  return jax.lax.reshape(x, shape, out_sharding=PartitionSpec(
      spec[0], None, *spec[1:x.ndim]))


def split(batch: Mapping[str, jax.Array], n: int,
          logical_axes: Mapping[str, Sequence[str | None]] | None = None
          ) -> dict[str, jax.Array]:
  """Each [B, ...] array as [n, B/n, ...]: micro-batch i holds rows i, n + i,
  2n + i, ... The batch axis is sharded in contiguous blocks, so each
  micro-batch takes an even share of every device's rows and the split moves
  no data (B/n must be a multiple of the data-parallel size).

  `logical_axes`: each array's axes as in the task's batch_spec (default
  ('batch', None, ...)); a micro-batch keeps them.
  """
  out = {}
  for k, x in batch.items():
    if x.shape[0] % n:
      raise ValueError(f'batch[{k!r}] has {x.shape[0]} rows, not a multiple '
                       f'of {n} micro-batches')
    axes = tuple((logical_axes or {}).get(k) or
                 ('batch',) + (None,) * (x.ndim - 1))
    y = jnp.swapaxes(_rows_to_micro(x, n), 0, 1)
    out[k] = rules.shard_activation(y, (None,) + axes)
  return out


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def value_and_grad(sums: Callable[[Any, Mapping[str, jax.Array]], Sums],
                   finish: Callable[[Sums], tuple[jax.Array, dict]],
                   params: Any, batch: Mapping[str, jax.Array], n: int,
                   counts: Sequence[str] = (),
                   logical_axes: Mapping[str, Sequence[str | None]] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """(loss, metrics, grads) of `finish(sums(params, batch))`, computed over
  `n` micro-batches of `batch` (see the module docstring for the contract).
  Equal to the one-batch values up to float summation order."""
  micro = split(batch, n, logical_axes)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(sums, params, first)
  zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  missing = [k for k in counts if k not in shapes]
  if missing:
    raise ValueError(f'counts {missing} are not among the sums {sorted(shapes)}')

  def add_counts(acc, mb):
    s = sums(params, mb)
    return _add(acc, {k: s[k] for k in counts}), None

  total_counts, _ = jax.lax.scan(add_counts, {k: zeros[k] for k in counts},
                                 micro)
  # ∂L/∂S at the true counts; the other sums' values do not matter (linear).
  at = dict(zeros, **total_counts)
  cot = jax.grad(lambda s: finish(s)[0])(at)
  cot = {k: (jnp.zeros_like(v) if k in counts else v) for k, v in cot.items()}

  def step(carry, mb):
    grads, acc = carry
    s, vjp = jax.vjp(lambda p: sums(p, mb), params)
    (g,) = vjp(cot)
    return (_add(grads, g), _add(acc, s)), None

  grads0 = jax.tree.map(jnp.zeros_like, params)
  (grads, total), _ = jax.lax.scan(step, (grads0, zeros), micro)
  loss, metrics = finish(total)
  return loss, metrics, grads
