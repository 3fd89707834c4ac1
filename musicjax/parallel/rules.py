"""Logical axis names -> mesh axes -> NamedSharding (MaxText-style rule table).

Parameters and activations name their dimensions logically ('batch', 'embed',
'mlp', ...). `config.sharding.rules` is an ordered list of
`(logical_name, mesh_axes)`; for each dimension the first rule that still
applies wins, and later rules with the same name are fallbacks. A rule applies
when at least one of its mesh axes is (a) not already used by another dimension
of the same array, (b) bigger than 1 and (c) divides the dimension; axes failing
these are dropped, so an awkward shape is replicated rather than an error.

Model code uses `shard_activation(x, ('batch', 'time', 'embed'))` to pin
activation layouts. It reads the rules the trainer installs with `use_rules` and
the mesh set by `jax.set_mesh`; it is a no-op when neither is active, so the
same code runs unsharded in a notebook.

FSDP in model code: a weight stored as ('embed', 'mlp') is sharded over 'fsdp'
on its embed dim. Gather that dim before the matmul with
`w = shard_activation(w, (None, 'mlp'))` (an all-gather over fsdp; the 'mlp'
tensor-parallel dim stays split). On Explicit meshes this is required: a matmul
whose output would use one mesh axis twice is a type error there. A matmul that
contracts a tensor-parallel dim needs its output layout: `matmul(h, w2,
('batch', 'embed'))`.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from musicjax.config import ConfigError

Rules = tuple[tuple[str, tuple[str, ...]], ...]
_MESH_AXES = ('data', 'fsdp', 'tensor')


def normalize_rules(raw: Sequence[Any]) -> Rules:
  """Checks `config.sharding.rules` and turns each entry into (name, axes)."""
  out = []
  for i, entry in enumerate(raw):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ConfigError(f'config.sharding.rules[{i}] must be a pair '
                        f'(logical_name, mesh_axes), got {entry!r}')
    name, axes = entry
    if not isinstance(name, str):
      raise ConfigError(f'config.sharding.rules[{i}]: logical name must be a '
                        f'string, got {name!r}')
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes)
    for a in axes:
      if a not in _MESH_AXES:
        raise ConfigError(f'config.sharding.rules[{i}] ({name!r}): unknown mesh '
                          f'axis {a!r}; mesh axes are {_MESH_AXES}')
    out.append((name, axes))
  return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    shape: Sequence[int], mesh: Mesh | Any, rules: Rules,
                    where: str = 'array') -> P:
  """PartitionSpec for one array from its logical names (see module doc)."""
  if not logical_axes:
    return P()
  if len(logical_axes) != len(shape):
    raise ValueError(f'{where}: {len(logical_axes)} logical axes '
                     f'{tuple(logical_axes)} for shape {tuple(shape)}')
  known = {name for name, _ in rules}
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in known:
      raise ConfigError(f'{where}: logical axis {name!r} has no entry in '
                        f'config.sharding.rules (add e.g. ({name!r}, None))')
    chosen: tuple[str, ...] = ()
    for rule_name, axes in rules:
      if rule_name != name:
        continue
      picked, size = [], 1
      for a in axes:
        n = mesh.shape[a]
        if a in used or n == 1 or dim % (size * n):
          continue
        picked.append(a)
        size *= n
      if picked:
        chosen = tuple(picked)
        break
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1
                else chosen)
  return P(*spec)


def logical_names(var: nnx.Variable) -> tuple | None:
  """The logical axis names a Variable was annotated with (None: replicated)."""
  meta = var.get_metadata()
  names = meta.get('out_sharding') or meta.get('sharding_names')
  return tuple(names) if names else None


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every Variable of an abstract NNX state.

  The result has the state's structure with a NamedSharding where each
  Variable was; it is a valid `in_shardings`/`out_shardings` prefix for the
  state pytree. Optimizer moments inherit their parameter's logical names.
  """
  def one(path, var):
    where = 'state/' + '/'.join(str(getattr(k, 'key', k)) for k in path)
    shape = var.get_value().shape
    return NamedSharding(mesh, logical_to_spec(logical_names(var), shape, mesh,
                                               rules, where))
  return jax.tree_util.tree_map_with_path(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch_spec: dict, mesh: Mesh, rules: Rules) -> dict:
  """NamedSharding per batch entry from the task's `batch_spec` logical axes."""
  return {k: NamedSharding(mesh, logical_to_spec(s.logical_axes, s.shape, mesh,
                                                  rules, f'batch[{k!r}]'))
          for k, s in batch_spec.items()}


class _Current(threading.local):
  rules: Rules | None = None


_current = _Current()


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """Installs the rule table for `shard_activation` (and Flax's own helpers)."""
  old = _current.rules
  _current.rules = rules
  flax_rules = tuple((n, a if len(a) != 1 else a[0]) if a else (n, None)
                     for n, a in rules)
  try:
    with nnx.logical_axis_rules(flax_rules):
      yield
  finally:
    _current.rules = old


def current_rules() -> Rules | None:
  return _current.rules


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None],
                     rules: Rules | None = None) -> jax.Array:
  """Constrains an activation's layout by logical names, inside jit.

  Auto mesh axes: `with_sharding_constraint` (a hint to the partitioner).
  Explicit mesh axes: `jax.sharding.reshard` (the sharding is part of the type).
  No-op without a mesh (set by `jax.set_mesh`) or rules (`use_rules`).
  """
  rules, mesh = _active(rules)
  if rules is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules, 'activation')
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def auto_axes_inside(f):
  """`f` with an Explicit mesh's axes made Auto inside it, outputs
  replicated: decoding's many small steps (sampling, caches, gathers) do not
  spell out their reshards, and XLA's partitioner places them as it does on
  an Auto mesh. Unchanged on an Auto mesh or none. Call it inside jit."""
  def run(*args, **kwargs):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not mesh.explicit_axes:
      return f(*args, **kwargs)
    return jax.sharding.auto_axes(f, out_sharding=P())(*args, **kwargs)
  return run


def _active(rules: Rules | None):
  rules = rules if rules is not None else _current.rules
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return None, None
  return rules, mesh


def matmul(x: jax.Array, w: jax.Array, out_axes: Sequence[str | None],
           rules: Rules | None = None) -> jax.Array:
  """`x @ w` with its output laid out by logical names `out_axes`.

  Needed when the contracted dim is tensor-parallel ('mlp', 'heads'): on an
  Explicit mesh the output sharding of such a contraction must be given.
  """
  rules, mesh = _active(rules)
  if rules is None:
    return x @ w
  shape = x.shape[:-1] + w.shape[-1:]
  spec = logical_to_spec(out_axes, shape, mesh, rules, 'matmul output')
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jnp.matmul(x, w, out_sharding=spec)
  return jax.lax.with_sharding_constraint(x @ w, spec)


def einsum(expr: str, a: jax.Array, b: jax.Array,
           out_axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
  """`jnp.einsum(expr, a, b)` with its output laid out by logical names (for
  contractions over tensor-parallel dims; see `matmul`)."""
  rules, mesh = _active(rules)
  if rules is None:
    return jnp.einsum(expr, a, b)
  ins, out = expr.replace(' ', '').split('->')
  sizes = {}
  for letters, arr in zip(ins.split(','), (a, b)):
    sizes.update(zip(letters, arr.shape))
  shape = tuple(sizes[ch] for ch in out)
  spec = logical_to_spec(out_axes, shape, mesh, rules, 'einsum output')
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jnp.einsum(expr, a, b, out_sharding=spec)
  return jax.lax.with_sharding_constraint(jnp.einsum(expr, a, b), spec)


def gather(tree: Any, rules: Rules | None = None) -> Any:
  """All-gathers every array of a (parameter) tree to replicated, inside jit.

  FSDP for small convolutional models: weights live sharded between steps and
  are gathered once where the step uses them; their gradients flow back through
  the reshard as a reduce-scatter. (Large transformers gather per layer instead.)
  No-op without a mesh or rules.
  """
  rules, mesh = _active(rules)
  if rules is None:
    return tree
  explicit = all(t == AxisType.Explicit for t in mesh.axis_types)

  def one(x):
    if not hasattr(x, 'ndim') or x.ndim == 0:
      return x
    spec = jax.sharding.PartitionSpec(*([None] * x.ndim))
    if explicit:
      return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(one, tree)


def reshape(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """`x.reshape(shape)` keeping the sharding of the leading dims it leaves alone
  (e.g. the batch); on Explicit meshes JAX asks for that to be spelled out.

  The first dim it changes keeps its sharding too when it is two dims merged
  (batch x channels -> rows, the minor one unsplit) or split (rows -> batch x
  channels, the major part divisible): audio channels folded into the batch
  stay split like the batch instead of being gathered whole."""
  mesh = jax.sharding.get_abstract_mesh()
  shape = tuple(shape)
  if mesh is None or mesh.empty or not all(
      t == AxisType.Explicit for t in mesh.axis_types):
    return x.reshape(shape)
  spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
  keep = 0
  while keep < min(x.ndim, len(shape)) and x.shape[keep] == shape[keep]:
    keep += 1
  out = list(spec[:keep]) + [None] * (len(shape) - keep)
  axes = spec[keep] if keep < x.ndim else None
  if axes is not None and keep < len(shape):
    names = axes if isinstance(axes, tuple) else (axes,)
    parts = math.prod(mesh.shape[n] for n in names)
    merged = (keep + 1 < x.ndim and spec[keep + 1] is None
              and x.shape[keep] * x.shape[keep + 1] == shape[keep])
    split = (keep + 1 < len(shape) and shape[keep] % parts == 0
             and shape[keep] * shape[keep + 1] == x.shape[keep])
    if merged or split:
      out[keep] = axes
  return jax.lax.reshape(x, shape,
                         out_sharding=jax.sharding.PartitionSpec(*out))


def take_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
  """`table[idx]` (an embedding lookup) whose rows follow `idx`'s sharding.

  On Explicit meshes a gather's output sharding must be spelled out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not all(
      t == AxisType.Explicit for t in mesh.axis_types):
    return table[idx]
  idx_spec = tuple(jax.typeof(idx).sharding.spec)
  idx_spec += (None,) * (idx.ndim - len(idx_spec))
  out = jax.sharding.PartitionSpec(*idx_spec, *([None] * (table.ndim - 1)))
  return table.at[idx].get(out_sharding=out)


def take_rows_or_zero(table: jax.Array, idx: jax.Array) -> jax.Array:
  """`take_rows`, with a zero vector for every negative id (EMPTY slots)."""
  rows = take_rows(table, jnp.maximum(idx, 0))
  return rows * (idx >= 0)[..., None].astype(rows.dtype)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(shardings: Any) -> dict[str, str]:
  """'path' -> 'P(...)' for logs and tests."""
  out = {}
  for path, s in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    out['/'.join(str(getattr(k, 'key', k)) for k in path)] = str(s.spec)
  return out
