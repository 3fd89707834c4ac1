"""Codebook interleaving patterns (MusicGen, arXiv 2306.05284 §2.2).

An RVQ codec gives K parallel token streams codes[B, T, K]. A single-stream
transformer models an interleaved sequence seq[B, S, K] one step at a time: at
step s it sees seq[:, :s] and predicts all K entries of seq[:, s] with one head
per codebook. The pattern decides which (frame, codebook) sits in which step:

  * 'parallel': S = T, every codebook of frame t at step t (cheapest, but
    codebook k cannot condition on codebook k-1 of the same frame).
  * 'delay': S = T + max(delays), codebook k of frame t at step t + delays[k];
    the default delays (0, 1, ..., K-1) let codebook k see the coarser
    codebooks of its frame at the cost of K-1 extra steps. 'parallel' is the
    all-zero-delay case.
  * 'flatten': S = T * K, one codebook per step (exact autoregression over
    codebooks, K times as many steps).

A pattern is declarative: static numpy tables fixed by (kind, K, T, delays),
so `build` / `revert` are plain gathers with constant indices and `step_slots`
indexes the tables with a (possibly traced) step; all of them trace under jit
for any batch size. Slots that hold no token read `special_token` in `build`
and are masked out of the loss (`loss_mask`).

`Pattern` hashes by its spec (not its tables), so it can be a static argument
of `jax.jit` or closed over.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('delay', 'parallel', 'flatten')


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Static index tables of one interleaving pattern; build with make_pattern.

  Attributes:
    kind: one of KINDS.
    num_codebooks: K.
    num_frames: T.
    delays: per-codebook step delay for 'delay' / 'parallel' (all zero), None
      for 'flatten'.
    frame_index: [S, K] int32, source frame of step-slot (s, k), -1 if empty.
    valid: [S, K] bool, frame_index >= 0.
    step_index: [T, K] int32, the step holding (t, k), -1 if none does.
  """
  kind: str
  num_codebooks: int
  num_frames: int
  delays: tuple[int, ...] | None
  # The tables follow from the fields above, so they stay out of eq / hash.
  frame_index: np.ndarray = dataclasses.field(compare=False, repr=False)
  valid: np.ndarray = dataclasses.field(compare=False, repr=False)
  step_index: np.ndarray = dataclasses.field(compare=False, repr=False)

  @property
  def num_steps(self) -> int:
    return self.frame_index.shape[0]


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_positive(name: str, value) -> int:
  if not _is_int(value) or value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  return int(value)


def _check_spec(kind: str, num_codebooks,
                delays: Sequence[int] | None) -> tuple[int, ...] | None:
  """Validates (kind, K, delays) and returns the delays the kind uses."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  k = _check_positive('num_codebooks', num_codebooks)
  if kind != 'delay':
    if delays is not None:
      raise ValueError(f"delays only applies to kind='delay', got "
                       f'delays={delays!r} with kind={kind!r}')
    return (0,) * k if kind == 'parallel' else None
  if delays is None:
    return tuple(range(k))
  delays = tuple(delays)
  if len(delays) != k:
    raise ValueError(f'delays must have num_codebooks={k} entries, got '
                     f'{len(delays)}: {delays!r}')
  if not all(_is_int(d) and d >= 0 for d in delays):
    raise ValueError(f'delays must be non-negative ints, got {delays!r}')
  return tuple(int(d) for d in delays)


def num_steps(kind: str, num_codebooks: int, num_frames: int,
              delays: Sequence[int] | None = None) -> int:
  """Sequence length S the pattern needs for num_frames frames."""
  d = _check_spec(kind, num_codebooks, delays)
  t = _check_positive('num_frames', num_frames)
  if kind == 'flatten':
    return t * int(num_codebooks)
  return t + max(d)


def frames_for_steps(kind: str, num_codebooks: int, steps: int,
                     delays: Sequence[int] | None = None) -> int:
  """How many leading frames are complete once steps 0 .. steps-1 are done.

  The inverse of num_steps on its range: frames_for_steps(num_steps(T)) == T.
  A frame is complete when all K of its codebooks have been emitted.
  """
  d = _check_spec(kind, num_codebooks, delays)
  if not _is_int(steps) or steps < 0:
    raise ValueError(f'steps must be an int >= 0, got {steps!r}')
  if kind == 'flatten':
    return int(steps) // int(num_codebooks)
  # Frame t is done once its most delayed codebook, at step t + max(d), is.
  return max(0, int(steps) - max(d))


def make_pattern(kind: str, num_codebooks: int, num_frames: int,
                 delays: Sequence[int] | None = None) -> Pattern:
  """Builds the static tables of a pattern (see the module docstring).

  Args:
    kind: 'delay', 'parallel' or 'flatten'.
    num_codebooks: K >= 1.
    num_frames: T >= 1.
    delays: only for 'delay': K non-negative ints, default (0, 1, ..., K-1).

  Returns:
    A hashable Pattern.
  """
  d = _check_spec(kind, num_codebooks, delays)
  k = int(num_codebooks)
  t = _check_positive('num_frames', num_frames)
  s = num_steps(kind, k, t, d if kind == 'delay' else None)
  steps = np.arange(s)[:, None]
  books = np.arange(k)[None, :]
  if kind == 'flatten':
    valid = steps % k == books
    frame = np.broadcast_to(steps // k, (s, k))
  else:
    frame = steps - np.asarray(d)[None, :]
    valid = (frame >= 0) & (frame < t)
  frame_index = np.where(valid, frame, -1).astype(np.int32)

  # Inverse table for revert; every (t, k) must come from at most one slot,
  # otherwise revert (a gather) would silently drop a duplicate.
  sv, kv = np.nonzero(valid)
  tv = frame_index[sv, kv]
  counts = np.zeros((t, k), np.int64)
  np.add.at(counts, (tv, kv), 1)
  if counts.max() > 1:
    raise AssertionError(f'{kind} pattern places a (frame, codebook) twice')
  step_index = np.full((t, k), -1, np.int32)
  step_index[tv, kv] = sv

  for a in (frame_index, valid, step_index):
    a.flags.writeable = False
  return Pattern(kind=kind, num_codebooks=k, num_frames=t, delays=d,
                 frame_index=frame_index, valid=valid, step_index=step_index)


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
  """Right-pads mask with singleton dims so it broadcasts over ndim dims."""
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def build(pattern: Pattern, codes: jax.Array,
          special_token) -> tuple[jax.Array, jax.Array]:
  """Interleaves codes [B, T, K, ...] into the step sequence.

  Args:
    pattern: from make_pattern.
    codes: [B, T, K, ...]; trailing dims are carried along.
    special_token: value of the empty slots (cast to codes.dtype).

  Returns:
    (seq [B, S, K, ...], valid [S, K] bool).
  """
  t, k = pattern.num_frames, pattern.num_codebooks
  if codes.ndim < 3 or tuple(codes.shape[1:3]) != (t, k):
    raise ValueError(f'codes must be [batch, {t}, {k}, ...] for this pattern '
                     f'(num_frames={t}, num_codebooks={k}), got {codes.shape}')
  src = np.maximum(pattern.frame_index, 0)
  seq = codes[:, src, np.arange(k)[None, :]]
  valid = jnp.asarray(pattern.valid)
  fill = jnp.asarray(special_token, codes.dtype)
  seq = jnp.where(_expand(valid, seq.ndim - 1), seq, fill)
  return seq, valid


def revert(pattern: Pattern,
           values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Puts step-slots back at their (frame, codebook): tokens or logits.

  Args:
    pattern: from make_pattern.
    values: [B, S, K, ...], e.g. tokens [B, S, K] or logits [B, S, K, V].

  Returns:
    (values_by_frame [B, T, K, ...], mask [T, K] bool): mask says which
    (t, k) some step filled; unfilled entries are zero.
  """
  s, k = pattern.num_steps, pattern.num_codebooks
  if values.ndim < 3 or tuple(values.shape[1:3]) != (s, k):
    raise ValueError(f'values must be [batch, {s}, {k}, ...] for this pattern '
                     f'(num_steps={s}, num_codebooks={k}), got {values.shape}')
  src = np.maximum(pattern.step_index, 0)
  out = values[:, src, np.arange(k)[None, :]]
  mask = jnp.asarray(pattern.step_index >= 0)
  out = jnp.where(_expand(mask, out.ndim - 1), out, jnp.zeros((), out.dtype))
  return out, mask


def loss_mask(pattern: Pattern) -> jax.Array:
  """[S, K] bool: the slots that hold a real token (and so carry loss)."""
  return jnp.asarray(pattern.valid)


def step_slots(pattern: Pattern, step) -> tuple[jax.Array, jax.Array]:
  """Where the K tokens of one step go in the frame grid.

  Args:
    pattern: from make_pattern.
    step: int or traced int scalar. A Python int must be in [0, S); a traced
      step outside that range gives an all-invalid result.

  Returns:
    (frame_index [K] int32, -1 where invalid; valid [K] bool).
  """
  s = pattern.num_steps
  if _is_int(step) and not 0 <= step < s:
    raise ValueError(f'step must be in [0, {s}) for this pattern, got {step}')
  step = jnp.asarray(step, jnp.int32)
  # jnp indexing clamps out-of-range indices, so range is checked explicitly.
  in_range = (step >= 0) & (step < s)
  idx = jnp.clip(step, 0, s - 1)
  valid = jnp.asarray(pattern.valid)[idx] & in_range
  frame = jnp.where(valid, jnp.asarray(pattern.frame_index)[idx], -1)
  return frame, valid


def write_step(pattern: Pattern, grid: jax.Array, step,
               tokens: jax.Array) -> jax.Array:
  """Writes the sampled tokens [B, K, ...] of one step into grid [B, T, K, ...].

  The decode-loop counterpart of revert: invalid slots of the step leave the
  grid unchanged (their scatter index is out of bounds and dropped).
  """
  t, k = pattern.num_frames, pattern.num_codebooks
  if grid.ndim < 3 or tuple(grid.shape[1:3]) != (t, k):
    raise ValueError(f'grid must be [batch, {t}, {k}, ...] for this pattern, '
                     f'got {grid.shape}')
  if tokens.shape != grid.shape[:1] + grid.shape[2:]:
    raise ValueError(f'tokens must be [batch, {k}, ...] matching grid '
                     f'{grid.shape}, got {tokens.shape}')
  frame, valid = step_slots(pattern, step)
  frame = jnp.where(valid, frame, t)
  return grid.at[:, frame, jnp.arange(k)].set(tokens.astype(grid.dtype),
                                              mode='drop')
