"""Another project's checkpoint tensors -> our model's state: the engine the
released-model loaders (heartmula.py, heartcodec.py) share.

A loader names, for each of our state paths ('backbone/layers/attn/wq'),
its `Source`: the checkpoint tensor(s) it is read from (one, or one per
index of our leading axis, stacked) and the `Rule` that turns one into
ours. The engine checks that every checkpoint tensor is used exactly once
or named as deliberately ignored, and every shape against our abstract
state (nnx.eval_shape: no random init of billions of parameters); errors
name the file and the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax.export.released import reader as reader_lib

CONFIG = 'config.json'
# Floating dtypes we widen or narrow to our parameters' dtypes.
FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')


# ---- their layout -> ours ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  to_ours: Callable[[np.ndarray], np.ndarray]
  theirs_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from our shape
  # The inverse, for exporting back to their layout (None: not exportable).
  to_theirs: Callable[[np.ndarray], np.ndarray] | None = None


SAME = Rule(lambda w: w, lambda s: s, lambda w: w)
# [out, in] -> [in, out]
LINEAR = Rule(lambda w: w.T, lambda s: (s[1], s[0]), lambda w: w.T)
ROW = Rule(lambda w: w[0], lambda s: (1,) + s, lambda w: w[None])  # [1, E] -> [E]
# nn.Conv1d.weight [out, in, k] -> [k, in, out].
CONV = Rule(lambda w: w.transpose(2, 1, 0), lambda s: (s[2], s[1], s[0]))
# A weight-normalised conv's g [out, 1, 1] -> [out].
WN_G = Rule(lambda w: w.reshape(-1), lambda s: (s[0], 1, 1))


def tables(k: int) -> Rule:
  """One table of k blocks of rows [k * rows, E] -> [k, rows, E]."""
  return Rule(lambda w: w.reshape(k, w.shape[0] // k, w.shape[1]),
              lambda s: (s[0] * s[1], s[2]))


def rotary_order(d: int) -> np.ndarray:
  # torchtune and heartlib rotate adjacent pairs (0, 1), (2, 3), ...; our
  # attention rotates (i, i + d/2). Reordering q and k alike leaves q.k
  # unchanged.
  return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


def heads_in(heads: int, d: int, rotary: bool = False) -> Rule:
  """[heads * d, E] -> [E, heads, d]; rotary: rows reordered for our rotary
  (q and k of adjacent-pair checkpoints)."""
  order = rotary_order(d) if rotary else np.arange(d)
  back = np.argsort(order)
  return Rule(lambda w: w.T.reshape(w.shape[1], heads, d)[..., order],
              lambda s: (s[1] * s[2], s[0]),
              lambda w: w[..., back].reshape(w.shape[0], heads * d).T)


def heads_out(heads: int, d: int) -> Rule:
  """[E, heads * d] -> [heads, d, E]."""
  return Rule(lambda w: w.T.reshape(heads, d, w.shape[0]),
              lambda s: (s[2], s[0] * s[1]),
              lambda w: w.reshape(heads * d, w.shape[2]).T)


def block_rules(heads: int, kv_heads: int, d: int, rotary: bool
                ) -> dict[str, Rule]:
  """Rules of our transformer block's arrays (nn/transformer.py) from torch
  linears; rotary: q and k of an adjacent-pair rotary checkpoint."""
  return {'attn_norm/scale': SAME, 'mlp_norm/scale': SAME,
          'attn/wq': heads_in(heads, d, rotary),
          'attn/wk': heads_in(kv_heads, d, rotary),
          'attn/wv': heads_in(kv_heads, d), 'attn/wo': heads_out(heads, d),
          'mlp/gate': LINEAR, 'mlp/up': LINEAR, 'mlp/down': LINEAR}


@dataclasses.dataclass(frozen=True)
class Source:
  names: list[str]      # one tensor, or one per index of our axis 0 (stacked)
  rule: Rule
  stacked: bool = False


def one(name: str, rule: Rule) -> Source:
  return Source([name], rule)


def layers(ours: str, theirs: Callable[[int], str], n: int,
           names: dict[str, str], rules: dict[str, Rule]
           ) -> dict[str, Source]:
  """Scanned layers: our `ours + path` stacks `theirs(i) + names[path]` over
  layers i < n, read with rules[path]."""
  return {ours + path: Source([theirs(i) + name for i in range(n)],
                              rules[path], stacked=True)
          for path, name in names.items()}


@dataclasses.dataclass(frozen=True)
class Mapping:
  """How one model's checkpoint maps onto our state, and how its errors read.

  Attributes:
    sources: our state path -> its Source.
    error: the exception class raised.
    ignored: regexes (fullmatch) of checkpoint tensors we deliberately skip.
    model: what lacks an extra tensor, in its error ('our model').
    missing_hint: appended to a missing tensor's "(needed for PATH".
    extra_hint: why a checkpoint may hold tensors we do not have.
    unmapped: why one of our paths may have no Source (a config of another
      structure); None: always our bug.
  """
  sources: dict[str, Source]
  error: type[Exception]
  ignored: tuple[str, ...] = ()
  model: str = 'our model'
  missing_hint: str = ''
  extra_hint: str = 'a checkpoint of another model?'
  unmapped: str | None = None


# ---- config.json ---------------------------------------------------------------
def read_config_json(folder: str, error: type[Exception], what: str,
                     model_type: str | None) -> tuple[dict[str, Any], str]:
  """(config.json of `folder` as a dict, its path); with `model_type`, its
  "model_type" must be that (`what` names the model in the errors)."""
  path = os.path.join(folder, CONFIG)
  if not os.path.isfile(path):
    raise error(f'{folder}: no {CONFIG} (not a {what} checkpoint folder)')
  try:
    with open(path) as f:
      d = json.load(f)
  except ValueError as err:
    raise error(f'{path}: not JSON ({err})') from None
  if not isinstance(d, dict):
    raise error(f'{path}: not a JSON object')
  if model_type is not None and d.get('model_type') != model_type:
    raise error(f'{path}: model_type is {d.get("model_type")!r}, not '
                f'{model_type!r} (not a {what} checkpoint)')
  return d, path


def check_same(path: str, theirs: dict[str, Any], ours: dict[str, Any],
               error: type[Exception]) -> None:
  """Each of `theirs` (config.json's numbers, by our config key) must be the
  config's (`ours`)."""
  for key in sorted(theirs):
    if ours.get(key) != theirs[key]:
      raise error(f'{path} gives {key} = {theirs[key]!r}, the config '
                  f'{ours.get(key)!r}: a config of another model')


# ---- checking and loading -----------------------------------------------------
def abstract_state(make: Callable[[], nnx.Module]):
  """(graphdef, state) of `make()` with shapes only (nnx.eval_shape); no mesh,
  so the sharding annotations stay metadata."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(make)
  return nnx.split(abstract)


def path_key(path) -> str:
  """'backbone/layers/attn/wq': a pure-dict leaf's path, as Mapping names it."""
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


def check(mapping: Mapping, state, shapes: dict[str, tuple[int, ...]],
          where: Callable[[str], str]) -> None:
  """Every leaf of `state` has its tensor(s) in `shapes` (name -> shape) at
  the shape its rule wants; every other tensor is ignored. `where(name)`
  prefixes the errors (the file)."""
  error, used = mapping.error, set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
    key = path_key(path)
    if key not in mapping.sources:
      if mapping.unmapped is None:
        raise AssertionError(f'no checkpoint tensor mapped to {key}')  # our bug
      raise error(f'config.model: our {key} has no {mapping.unmapped}')
    src = mapping.sources[key]
    want = src.rule.theirs_shape(
        tuple(leaf.shape[1:]) if src.stacked else tuple(leaf.shape))
    for name in src.names:
      if name not in shapes:
        raise error(f'{where(name)}tensor {name!r} is missing (needed for '
                    f'{key}{mapping.missing_hint})')
      if tuple(shapes[name]) != want:
        raise error(f'{where(name)}tensor {name!r} has shape '
                    f'{tuple(shapes[name])}, the config gives {want} (for '
                    f'{key})')
      if name in used:
        raise AssertionError(f'{name} mapped twice')  # our bug
      used.add(name)
  ignored = [re.compile(p) for p in mapping.ignored]
  extra = sorted(n for n in set(shapes) - used
                 if not any(p.fullmatch(n) for p in ignored))
  if extra:
    raise error(f'{where(extra[0])}tensors {mapping.model} does not have: '
                f'{", ".join(extra[:5])}{" ..." if len(extra) > 5 else ""} '
                f'({mapping.extra_hint})')


def check_layout(mapping: Mapping, make: Callable[[], nnx.Module],
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """`check` of a checkpoint's names and shapes (name -> shape) against the
  model `make` builds, without any values."""
  _, state = abstract_state(make)
  check(mapping, state, shapes, lambda name: '')


def load_arrays(mapping: Mapping, state, reader: reader_lib.Reader,
                place: Callable[[str, np.ndarray], Any]) -> dict:
  """The pure dict of abstract `state`, each leaf read from the checkpoint,
  cast to the leaf's dtype and handed to `place(path, value)`, whose result
  is kept (e.g. the array on its sharding).

  One leaf at a time: its host value is built in place (a stacked leaf layer
  by layer) and dropped once placed, so the host never holds more than one of
  our arrays and the checkpoint tensors it is made of.
  """
  check(mapping, state, reader.shapes(), lambda name: f'{reader.path(name)}: ')

  def get(name):
    dtype = reader.dtype(name)
    if dtype not in FLOAT_DTYPES:
      raise mapping.error(f'{reader.path(name)}: tensor {name!r} has dtype '
                          f'{dtype}, not one of {FLOAT_DTYPES}')
    return reader.get(name)

  def fill(path, leaf):
    key = path_key(path)
    src = mapping.sources[key]
    value = np.empty(leaf.shape, leaf.dtype)
    if src.stacked:
      for i, name in enumerate(src.names):
        value[i] = src.rule.to_ours(get(name)).astype(leaf.dtype, copy=False)
    else:
      value[...] = src.rule.to_ours(get(src.names[0])).astype(leaf.dtype,
                                                              copy=False)
    return place(key, value)

  return jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))


def export_tensors(mapping: Mapping, arrays: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
  """Their tensors by name from our arrays by path (the inverse of
  load_arrays): every source's rule turned back, stacked ones per index."""
  out = {}
  for key, src in mapping.sources.items():
    if src.rule.to_theirs is None:
      raise AssertionError(f'the rule of {key} has no inverse')  # our bug
    value = np.asarray(arrays[key])
    parts = ([value[i] for i in range(len(src.names))] if src.stacked
             else [value])
    for name, part in zip(src.names, parts):
      out[name] = np.ascontiguousarray(src.rule.to_theirs(part))
  return out


def load(mapping: Mapping, make: Callable[[], nnx.Module],
         reader: reader_lib.Reader) -> nnx.Module:
  """`make()`'s model holding the checkpoint's tensors, cast to our dtypes,
  on the default device."""
  gdef, state = abstract_state(make)
  pure = load_arrays(mapping, state, reader, lambda key, v: jnp.asarray(v))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(gdef, state)
