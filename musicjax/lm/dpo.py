"""Direct Preference Optimization of a trained audio-token LM (seed 001 §3.3.2).

Why a task of its own: DPO needs two models in the train state, the policy
being trained and a frozen reference, both starting from a trained LM run,
and batches of (winner, loser) pairs that share one prompt. The loss is

  Δ = (log pθ(w|C) - log pref(w|C)) - (log pθ(l|C) - log pref(l|C))   (eq. 12)
  L = -E log σ(β Δ)                                                   (eq. 11)

with log p(A|C) summed over every slot of the candidate, split as in eq. 13
into the global term (codebook 0, END included) and the local term
(codebooks 1..K-1): `dpo/global_margin` and `dpo/local_margin` show which
level the preference moved (they sum to `dpo/reward_margin`).

* The reference's weights live in `FrozenParam` variables: not `nnx.Param`,
  so neither the gradient (taken w.r.t. Params) nor the optimizer (wrt=Param)
  ever touches them; they keep the Params' logical axis names, so the
  reference is sharded exactly like the policy.
* `warm_start` (fresh runs only) restores the `model` subtree of the latest
  checkpoint of `dpo.init_workdir` into both policy and reference; a resumed
  run restores its own checkpoint, reference included.
* Pairs (`dpo.pairs`): a JSONL file or a directory of ArrayRecord shards, as
  written by `musicjax prefs` (musicjax/lm/prefs.py). The whole file is
  validated when the dataset is built, so a malformed record stops the run
  before the first step rather than hours in. Both candidates are laid out in
  the prefix layout with the same prompt; a candidate longer than
  `data.max_frames` is cut there (no END).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
from typing import Any, Mapping, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicjax.config import ConfigError
from musicjax.data import npz
from musicjax.errors import UserError
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import sequence
from musicjax.lm import task as task_lib
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import runs
from musicjax.train.task import ArraySpec

ConfigDict = ml_collections.ConfigDict

SIDES = ('winner', 'loser')
# Slot arrays of one candidate (musicjax/lm/sequence.py `assemble`).
SEQ_KEYS = ('text', 'audio', 'melody', 'positions', 'valid')
# Keys of a JSONL pair. Informational keys (written by `musicjax prefs`) are
# allowed and ignored; anything else is a typo and an error.
_CODE_KEYS = ('winner', 'loser')
_NPZ_KEYS = ('winner_npz', 'loser_npz')
_END_KEYS = ('winner_end', 'loser_end')
_TEXT_KEYS = ('tags', 'lyrics')
_INFO_KEYS = ('scores', 'metric', 'source', 'seed')
_JSONL_KEYS = (_CODE_KEYS + _NPZ_KEYS + _END_KEYS + _TEXT_KEYS + ('melody',)
               + _INFO_KEYS)
# ArrayRecord pair records (np.savez): '<side>_codes' [F, K], optional
# 'melody' [F], and meta_json with the text keys, END flags and info keys.
_RECORD_CODES = '{side}_codes'
_NPZ_CODES = 'codes'
JSONL_SUFFIX = '.jsonl'
SHARD_SUFFIX = '.array_record'
# Model keys that may differ from the init run: they change neither the
# parameters' shapes nor the function they compute.
# Keys that do not change the weights' layout (scanned or unrolled layers
# share the same stacked parameters).
_FREE_MODEL_KEYS = ('embed_init_std', 'max_seq_len', 'backbone.init_std',
                    'backbone.dtype', 'backbone.remat', 'backbone.scan_layers',
                    'backbone.attention_chunk', 'local.init_std', 'local.dtype',
                    'local.remat', 'local.scan_layers', 'local.attention_chunk')
# Tasks whose checkpoints hold an AudioLM under `model`.
_INIT_TASKS = ('lm', 'lm_dpo')
# Eval split: records whose index hash (in [0, 1)) is below dpo.eval_fraction.
_HASH_BYTES = 4


def default_config() -> ConfigDict:
  """The LM's keys, DPO optimizer defaults and the `dpo` section."""
  c = task_lib.default_config()
  o = c.optim
  o.lr = 1e-7                 # seed 001 §3.3.3 (3B model)
  o.warmup_steps = 10
  o.schedule = 'constant'
  o.weight_decay = 0.0        # decay pulls toward zero, not toward the reference
  p = c.dpo = ConfigDict()
  p.init_workdir = ''         # LM run whose latest checkpoint starts policy + reference
  p.beta = 0.1                # KL penalty β (seed 001 §3.3.3)
  p.pairs = ''                # pairs.jsonl, or a directory of *.array_record shards
  p.eval_fraction = 0.1       # share of pairs for eval (0: eval on the train pairs)
  return c


def check_config(config: ConfigDict) -> None:
  p = config.dpo
  if not p.beta > 0:
    raise ConfigError(f'config.dpo.beta must be > 0, got {p.beta}')
  if not 0.0 <= p.eval_fraction < 1.0:
    raise ConfigError(f'config.dpo.eval_fraction must be in [0, 1), got '
                      f'{p.eval_fraction}')
  if config.data.layout != 'prefix':
    raise ConfigError("config.data.layout must be 'prefix' for DPO (a pair is "
                      'a prompt + whole-song candidates), got '
                      f'{config.data.layout!r}')


# ------------------------------------------------------------------- state


class FrozenParam(nnx.Variable):
  """Reference-model weights: not an nnx.Param, so never trained."""


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def freeze(module: nnx.Module) -> nnx.Module:
  """A module whose Params are FrozenParams (same values and metadata)."""
  graphdef, st = nnx.split(module)
  st = jax.tree.map(
      lambda v: FrozenParam(v.get_value(), **v.get_metadata())
      if isinstance(v, nnx.Param) else v, st, is_leaf=_is_var)
  return nnx.merge(graphdef, st)


class DPOState(nnx.Module):
  """Policy (trained), frozen reference, optimizer and step counter."""

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    self.model = model_lib.AudioLM(config.model, rngs)
    # Overwritten by warm_start; a separate init keeps every buffer distinct.
    self.ref = freeze(model_lib.AudioLM(config.model, rngs))
    self.opt = nnx.Optimizer(self.model, task_lib.make_optimizer(
        config.optim, config.train.steps), wrt=nnx.Param)
    self.step = task_lib.StepCounter(jnp.zeros((), jnp.int32))


def copy_policy_to_reference(state: nnx.State) -> nnx.State:
  """Sets the reference weights of a DPO train state to copies of the policy's."""
  pure = nnx.to_pure_dict(state['model'])
  nnx.replace_by_pure_dict(state['ref'], jax.tree.map(jnp.copy, pure))
  return state


# -------------------------------------------------------------------- loss


class PairLogps(NamedTuple):
  """Sequence log-probabilities [B] of winner and loser, global and local."""
  winner_global: jax.Array
  winner_local: jax.Array
  loser_global: jax.Array
  loser_local: jax.Array


def _side(batch: Mapping[str, jax.Array], side: str) -> dict[str, jax.Array]:
  return {k: batch[f'{side}/{k}'] for k in SEQ_KEYS}


def pair_log_probs(model: model_lib.AudioLM, batch: Mapping[str, jax.Array],
                   local_slots: int | None = None) -> PairLogps:
  """log p(candidate | prompt) of both candidates (eq. 13), one forward pass
  over winner and loser stacked on the batch axis. `local_slots`: the most
  frames a candidate has (the local transformer runs on those slots only)."""
  w, l = _side(batch, 'winner'), _side(batch, 'loser')
  both = {k: jnp.concatenate([w[k], l[k]]) for k in SEQ_KEYS}
  if 'ref_codes' in batch:
    both['ref_codes'] = jnp.concatenate([batch['ref_codes']] * 2)
    both['ref_valid'] = jnp.concatenate([batch['ref_valid']] * 2)
  glob_lp, loc_lp, _, _ = model_lib.token_log_probs(
      model, both, model(both, local_slots))
  g, lo = jnp.sum(glob_lp, axis=-1), jnp.sum(loc_lp, axis=-1)
  b = w['text'].shape[0]
  return PairLogps(g[:b], lo[:b], g[b:], lo[b:])


def dpo_loss(policy: PairLogps, reference: PairLogps, beta: float):
  """-mean log σ(β Δ) (eq. 11-13) and its metrics."""
  dg = ((policy.winner_global - reference.winner_global)
        - (policy.loser_global - reference.loser_global))
  dl = ((policy.winner_local - reference.winner_local)
        - (policy.loser_local - reference.loser_local))
  delta = dg + dl
  loss = -jnp.mean(jax.nn.log_sigmoid(beta * delta))
  chosen = beta * ((policy.winner_global + policy.winner_local)
                   - (reference.winner_global + reference.winner_local))
  rejected = beta * ((policy.loser_global + policy.loser_local)
                     - (reference.loser_global + reference.loser_local))
  metrics = {
      'loss': loss,
      'dpo/loss': loss,
      'dpo/reward_margin': jnp.mean(beta * delta),
      'dpo/global_margin': jnp.mean(beta * dg),
      'dpo/local_margin': jnp.mean(beta * dl),
      'dpo/accuracy': jnp.mean((delta > 0).astype(jnp.float32)),
      'dpo/chosen_reward': jnp.mean(chosen),
      'dpo/rejected_reward': jnp.mean(rejected),
  }
  return loss, metrics


# -------------------------------------------------------------------- task


class DPOTask(task_lib.LMTask):
  name = 'lm_dpo'
  progress_metrics = ('loss', 'dpo/accuracy', 'dpo/reward_margin')

  @classmethod
  def default_config(cls) -> ConfigDict:
    return default_config()

  def __init__(self, config: ConfigDict):
    super().__init__(config)
    check_config(config)
    self._pairs = None   # validated pair source, built once per task

  def create_state(self, rngs: nnx.Rngs) -> DPOState:
    return DPOState(self.config, rngs)

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    lm = super().batch_spec(batch_size)
    spec = {f'{side}/{k}': lm[k] for side in SIDES for k in SEQ_KEYS}
    for k in ('ref_codes', 'ref_valid'):
      if k in lm:
        spec[k] = lm[k]
    return spec

  def _log_probs(self, model, batch) -> PairLogps:
    # Candidates are cut to max_frames frames (PairExample).
    return pair_log_probs(model, batch, self.config.data.max_frames)

  def _reference(self, state: DPOState, batch) -> PairLogps:
    return jax.lax.stop_gradient(self._log_probs(state.ref, batch))

  def train_step(self, state: DPOState, batch, rng):
    del rng  # pairs carry no randomness
    ref = self._reference(state, batch)
    gdef, params, rest = nnx.split(state.model, nnx.Param, ...)
    beta = self.config.dpo.beta

    def loss_fn(p):
      pol = self._log_probs(nnx.merge(gdef, p, rest), batch)
      return dpo_loss(pol, ref, beta)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    state.opt.update(state.model, grads)
    state.step[...] = state.step[...] + 1
    metrics['optim/grad_norm'] = optax.tree.norm(grads)
    return metrics

  def eval_step(self, state: DPOState, batch, rng):
    del rng
    pol = self._log_probs(state.model, batch)
    _, metrics = dpo_loss(pol, self._reference(state, batch),
                          self.config.dpo.beta)
    return metrics

  def summaries(self, state: DPOState, batch, rng):
    """The LM's summaries for the first pair's prompt, its winner as the
    reference the policy's clip is shown beside."""
    one = {k: batch[f'winner/{k}'] for k in SEQ_KEYS}
    one.update({k: batch[k] for k in ('ref_codes', 'ref_valid') if k in batch})
    return super().summaries(state, one, rng)

  def warm_start(self, state: nnx.State, shardings: Any) -> nnx.State:
    """Policy and reference <- the LM weights of `dpo.init_workdir`."""
    restored = restore_init_model(self.config, state, shardings)
    nnx.replace_by_pure_dict(state['model'], restored)
    copy_policy_to_reference(state)
    return jax.device_put(state, shardings)

  def pair_source(self):
    if self._pairs is None:
      src = load_pairs(self.config)
      check_examples(self.config, src)
      self._pairs = src
    return self._pairs

  def dataset(self, split: str, shard_index: int, shard_count: int):
    return pair_dataset(self.config, split, shard_index, shard_count,
                        self.pair_source())


# -------------------------------------------------------------- warm start


def _say(msg: str) -> None:
  from musicjax.parallel import distributed  # pylint: disable=g-import-not-at-top
  if distributed.is_primary():
    print(f'[dpo] {msg}', file=sys.stderr, flush=True)


def _init_dir(config: ConfigDict) -> str:
  d = config.dpo.init_workdir
  if not d:
    raise ConfigError('config.dpo.init_workdir is empty: DPO fine-tunes a '
                      'trained LM; set --config.dpo.init_workdir=runs/lm')
  return os.path.expanduser(d)


def restore_init_model(config: ConfigDict, state: nnx.State,
                       shardings: Any) -> dict:
  """Pure dict of the init run's `model` weights, on `shardings['model']`.

  Only the model subtree is read (partial restore): the init run's optimizer
  moments never reach device memory.
  """
  init_dir = _init_dir(config)
  init_config = runs.check_same_model(
      config, init_dir, expect=_INIT_TASKS, flag='config.dpo.init_workdir',
      free_keys=_FREE_MODEL_KEYS)
  restored, step = ckpt_lib.restore_subtree(
      init_dir, init_config.checkpoint.keep, 'model', state['model'],
      shardings['model'])
  _say(f'policy and reference start from {init_dir} step {step}')
  return restored


# -------------------------------------------------------------------- data


def _codes(value: Any, where: str, what: str, num_codebooks: int,
           codebook_size: int) -> np.ndarray:
  """A candidate's codes as int32 [F, K], checked."""
  try:
    arr = np.asarray(value)
  except (ValueError, TypeError) as e:
    raise UserError(f'{where}: {what} is not a rectangular [frames][codebooks] '
                    f'array of integers ({e})') from None
  if arr.ndim != 2 or arr.shape[0] < 1 or not (
      np.issubdtype(arr.dtype, np.integer)):
    raise UserError(f'{where}: {what} must be a non-empty [frames][codebooks] '
                    f'array of integers, got {arr.dtype} shape {arr.shape}')
  if arr.shape[1] != num_codebooks:
    raise UserError(f'{where}: {what} has {arr.shape[1]} codebooks per frame, '
                    f'but config.model.num_codebooks = {num_codebooks}; make '
                    'the pairs with this LM (`musicjax prefs --workdir ...`)')
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= codebook_size:
    raise UserError(f'{where}: {what} has codes in [{lo}, {hi}], outside '
                    f'[0, {codebook_size}) (config.model.codebook_size)')
  return arr.astype(np.int32)


def _melody(value: Any, where: str) -> np.ndarray | None:
  """Per-frame chroma classes 0..11 (-1: silent), or None."""
  if value is None:
    return None
  try:
    arr = np.asarray(value)
  except (ValueError, TypeError):
    arr = np.zeros((0, 0))
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise UserError(f'{where}: "melody" must be a list of integers (chroma '
                    f'class per frame), got shape {arr.shape}')
  if arr.size and (arr.min() < -1 or arr.max() >= layout.MELODY_CLASSES):
    raise UserError(f'{where}: "melody" values must be in [-1, '
                    f'{layout.MELODY_CLASSES - 1}] (chroma class, -1 = silent)')
  return arr.astype(np.int32)


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
  value = obj.get(key, '')
  if not isinstance(value, str):
    raise UserError(f'{where}: "{key}" must be a string, got '
                    f'{type(value).__name__}')
  return value


def _end(obj: Mapping[str, Any], key: str, where: str) -> bool:
  value = obj.get(key, True)
  if not isinstance(value, bool):
    raise UserError(f'{where}: "{key}" must be true or false')
  return value


def _load_npz_codes(path: str, where: str, key: str, k: int, v: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise UserError(f'{where}: "{key}" file not found: {path}')
  try:
    with np.load(path, allow_pickle=False) as z:
      if _NPZ_CODES not in z.files:
        raise UserError(f'{where}: {path} ("{key}") has no "{_NPZ_CODES}" array '
                        f'(has {sorted(z.files)})')
      arr = z[_NPZ_CODES]
  except (OSError, ValueError) as e:
    raise UserError(f'{where}: {path} ("{key}") is not a readable .npz '
                    f'({e})') from None
  return _codes(arr, where, f'"{key}" codes', k, v)


def parse_pair(obj: Any, where: str, base_dir: str, num_codebooks: int,
               codebook_size: int) -> dict[str, Any]:
  """One JSONL object -> {'tags', 'lyrics', 'melody', 'winner', 'loser',
  'winner_end', 'loser_end'}; raises UserError naming `where`."""
  if not isinstance(obj, dict):
    raise UserError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  unknown = sorted(set(obj) - set(_JSONL_KEYS))
  if unknown:
    raise UserError(f'{where}: unknown key(s) {unknown}; a pair has '
                    f'{list(_TEXT_KEYS)}, "melody", "winner"/"loser" (codes) '
                    'or "winner_npz"/"loser_npz" (paths)')
  out: dict[str, Any] = {k: _text(obj, k, where) for k in _TEXT_KEYS}
  out['melody'] = _melody(obj.get('melody'), where)
  for side, npz_key, end_key in zip(_CODE_KEYS, _NPZ_KEYS, _END_KEYS):
    if side in obj and npz_key in obj:
      raise UserError(f'{where}: give either "{side}" or "{npz_key}", not both')
    if side in obj:
      out[side] = _codes(obj[side], where, f'"{side}"', num_codebooks,
                         codebook_size)
    elif npz_key in obj:
      if not isinstance(obj[npz_key], str):
        raise UserError(f'{where}: "{npz_key}" must be a path string')
      path = os.path.join(base_dir, os.path.expanduser(obj[npz_key]))
      out[side] = _load_npz_codes(path, where, npz_key, num_codebooks,
                                  codebook_size)
    else:
      raise UserError(f'{where}: missing key "{side}" (codes [frames][K]) or '
                      f'"{npz_key}" (an .npz with "{_NPZ_CODES}")')
    out[end_key] = _end(obj, end_key, where)
  return out


def encode_pair_record(pair: Mapping[str, Any],
                       info: Mapping[str, Any] | None = None) -> bytes:
  """A pair as ArrayRecord record bytes (np.savez; read with allow_pickle=False)."""
  meta = {k: pair.get(k, '') for k in _TEXT_KEYS}
  meta.update({k: bool(pair.get(k, True)) for k in _END_KEYS})
  meta.update(info or {})
  arrays = {_RECORD_CODES.format(side=s): np.asarray(pair[s], np.int32)
            for s in SIDES}
  if pair.get('melody') is not None:
    arrays['melody'] = np.asarray(pair['melody'], np.int8)
  arrays['meta_json'] = np.frombuffer(
      json.dumps(meta, ensure_ascii=False).encode('utf-8'), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_pair_record(raw: bytes, where: str, num_codebooks: int,
                       codebook_size: int) -> dict[str, Any]:
  try:
    arrays = npz.load_npz(raw)
    meta = json.loads(arrays.pop('meta_json').tobytes().decode('utf-8'))
  except Exception as e:  # np.load/json raise many types for damaged bytes
    raise UserError(f'{where}: damaged pair record ({type(e).__name__}: {e})'
                    ) from None
  names = {s: _RECORD_CODES.format(side=s) for s in SIDES}
  missing = [n for n in names.values() if n not in arrays]
  if missing:
    raise UserError(f'{where}: pair record lacks {missing}')
  if not isinstance(meta, dict):
    raise UserError(f'{where}: meta_json must be a JSON object')
  obj = dict(meta)
  obj.update({s: arrays[n] for s, n in names.items()})
  if 'melody' in arrays:
    obj['melody'] = arrays['melody']
  return parse_pair(obj, where, '', num_codebooks, codebook_size)


class JsonlPairs:
  """Random access to the pairs of a JSONL file by line offsets (picklable)."""

  def __init__(self, path: str, offsets: list[tuple[int, int]],
               num_codebooks: int, codebook_size: int):
    self.path = path
    self._offsets = offsets   # (byte offset, line number) per pair
    self._k, self._v = num_codebooks, codebook_size

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, i: int) -> str:
    return f'{self.path} line {self._offsets[i][1]}'

  def __getitem__(self, i: int) -> dict[str, Any]:
    offset, _ = self._offsets[i]
    with open(self.path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    return self._parse(line, self.where(i))

  def _parse(self, line: bytes, where: str) -> dict[str, Any]:
    try:
      obj = json.loads(line.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
      raise UserError(f'{where}: not valid JSON ({e})') from None
    return parse_pair(obj, where, os.path.dirname(self.path), self._k, self._v)

  @classmethod
  def scan(cls, path: str, num_codebooks: int, codebook_size: int) -> 'JsonlPairs':
    """Reads the file once, checking every line; blank lines are skipped."""
    offsets = []
    out = cls(path, offsets, num_codebooks, codebook_size)
    with open(path, 'rb') as f:
      offset, number = 0, 0
      for line in f:
        number += 1
        if line.strip():
          out._parse(line, f'{path} line {number}')
          offsets.append((offset, number))
        offset += len(line)
    return out


class ArrayRecordPairs:
  """Pairs from ArrayRecord shards, in shard order (picklable)."""

  def __init__(self, paths: list[str], num_codebooks: int, codebook_size: int):
    self.paths = paths
    self._k, self._v = num_codebooks, codebook_size
    self._src = grain.sources.ArrayRecordDataSource(paths)
    counts = [len(grain.sources.ArrayRecordDataSource([p])) for p in paths]
    self._starts = np.cumsum([0] + counts)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def where(self, i: int) -> str:
    s = int(np.searchsorted(self._starts, i, side='right')) - 1
    return f'{self.paths[s]} record {i - int(self._starts[s])}'

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_pair_record(self._src[i], self.where(i), self._k, self._v)


def load_pairs(config: ConfigDict):
  """The validated pairs of `dpo.pairs`: JsonlPairs or ArrayRecordPairs."""
  m = config.model
  path = os.path.expanduser(config.dpo.pairs)
  if not path:
    raise ConfigError('config.dpo.pairs is empty: set it to a pairs.jsonl file or '
                      'a directory of pair shards (make them with `musicjax '
                      'prefs --workdir LM_RUN --out pairs.jsonl`)')
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, f'*{SHARD_SUFFIX}')))
    if not paths:
      raise UserError(f'config.dpo.pairs={path!r} is a directory without '
                      f'*{SHARD_SUFFIX} shards')
    src = ArrayRecordPairs(paths, m.num_codebooks, m.codebook_size)
    for i in range(len(src)):
      src[i]  # pylint: disable=pointless-statement  (validates record i)
  elif os.path.isfile(path):
    src = JsonlPairs.scan(path, m.num_codebooks, m.codebook_size)
  else:
    raise UserError(f'config.dpo.pairs={path!r} not found (a {JSONL_SUFFIX} file '
                    f'or a directory of *{SHARD_SUFFIX} shards)')
  if len(src) == 0:
    raise UserError(f'config.dpo.pairs={path!r} holds no pairs')
  return src


def _hash_fraction(index: int) -> float:
  digest = hashlib.sha1(str(index).encode('utf-8')).digest()
  return int.from_bytes(digest[:_HASH_BYTES], 'big') / 2 ** (8 * _HASH_BYTES)


def split_indices(n: int, eval_fraction: float) -> dict[str, list[int]]:
  """Stable split of record indices by hash. With eval_fraction > 0 each split
  gets at least one record when n >= 2; with 0 eval reuses the train records."""
  frac = [_hash_fraction(i) for i in range(n)]
  eval_set = {i for i in range(n) if frac[i] < eval_fraction}
  if eval_fraction > 0 and not eval_set and n >= 2:
    eval_set = {min(range(n), key=lambda i: frac[i])}
  if len(eval_set) == n and n >= 2:
    eval_set.remove(max(range(n), key=lambda i: frac[i]))
  train = [i for i in range(n) if i not in eval_set]
  return {'train': train, 'eval': sorted(eval_set) if eval_fraction > 0 else train}


def prompt_ids(text, tags: str, lyrics: str, budget: int) -> list[int]:
  """Condition ids of a prompt, built the way `musicjax generate` builds them
  from --tags and --lyrics (so pairs match the prompts that made them)."""
  from musicjax.data import song_text  # pylint: disable=g-import-not-at-top
  tags_text = None
  if tags.strip():
    tags_text = song_text.format_tags(song_text.derive_tags({'tags': tags})) or None
  secs = song_text.parse_lyrics_file(lyrics) if lyrics else []
  lyr = '\n'.join(f'{m}\n{x}' if x else m for m, x in secs) or None
  return text.prefix(tags_text, lyr, False, budget)


def melody_ids(chroma: np.ndarray | None, frames: int, use: bool) -> np.ndarray:
  """Melody ids of `frames` frames; NULL past the given melody or when unused."""
  out = np.full((frames,), layout.MELODY_NULL, np.int32)
  if chroma is not None and use:
    ids = sequence.melody_ids(chroma, frames, dropped=False)
    out[:len(ids)] = ids
  return out


class PairExample:
  """Pair -> slot arrays of both candidates with the same prefix prompt."""

  def __init__(self, config: ConfigDict):
    from musicjax.lm import conditions  # pylint: disable=g-import-not-at-top
    from musicjax.lm import token_data  # pylint: disable=g-import-not-at-top
    self.config = config
    self.text = conditions.ConditionText(token_data.load_tokenizer(config),
                                         config.model.text_vocab_size)

  def __call__(self, pair: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from musicjax.lm.data import audio_slots  # pylint: disable=g-import-not-at-top
    c = self.config
    m = c.model
    ids = prompt_ids(self.text, pair['tags'], pair['lyrics'],
                     c.data.max_text_tokens)
    ex = {}
    for side in SIDES:
      # At most max_frames frames (the END only if the candidate fits whole).
      codes = pair[side][:c.data.max_frames]
      n = len(codes)
      end = pair[f'{side}_end'] and n == len(pair[side])
      # One more than the frames: the slot that predicts END carries the
      # melody of the frame after the song, as the sampler gave it.
      mel = melody_ids(pair['melody'], n + 1, c.cond.melody)
      part = audio_slots(c, codes, mel[:n], end)
      if m.variant == 'global_local':
        part.next_melody = int(mel[n])
      seq = sequence.assemble([sequence.TextPart(ids), part],
                              task_lib.seq_len(c), m.num_codebooks,
                              m.codebook_size)
      ex.update({f'{side}/{k}': seq[k] for k in SEQ_KEYS})
    r = c.data.reference_frames
    if r:
      ex['ref_codes'] = np.full((r, m.num_codebooks), layout.EMPTY, np.int32)
      ex['ref_valid'] = np.asarray(False)
    return ex


class _Subset:
  """Records `indices` of `source`, as a grain data source."""

  def __init__(self, source, indices: list[int]):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i % len(self._indices)]]


class _PairMap(grain.transforms.Map):

  def __init__(self, example: PairExample):
    self._example = example

  def map(self, pair):
    return self._example(pair)


def check_examples(config: ConfigDict, source) -> None:
  """Builds every example once: prompt text errors surface before training."""
  ex = PairExample(config)
  too_long = 0
  for i in range(len(source)):
    pair = source[i]
    try:
      ex(pair)
    except UserError as e:
      raise UserError(f'{source.where(i)}: {e}') from None
    too_long += sum(len(pair[s]) > config.data.max_frames for s in SIDES)
  if too_long:
    _say(f'{too_long} of {2 * len(source)} candidates are longer than '
         f'config.data.max_frames={config.data.max_frames}: their first '
         f'{config.data.max_frames} frames are used (no END)')


def pair_dataset(config: ConfigDict, split: str, shard_index: int,
                 shard_count: int, source=None):
  """Batches of pairs for `split` (Grain; the iterator state is checkpointed)."""
  from musicjax.lm.data import local_batch  # pylint: disable=g-import-not-at-top
  if source is None:
    source = load_pairs(config)
    check_examples(config, source)
  idx = split_indices(len(source), config.dpo.eval_fraction)[split]
  if not idx:
    raise UserError(f'config.dpo.pairs={config.dpo.pairs!r}: no {split} pairs '
                    f'among {len(source)} (config.dpo.eval_fraction='
                    f'{config.dpo.eval_fraction}); add pairs')
  ds = grain.MapDataset.source(_Subset(source, idx))
  if split == 'train':
    ds = ds.shuffle(seed=config.data.shuffle_seed)
  ds = ds.repeat().map(_PairMap(PairExample(config)))
  ds = ds[shard_index::shard_count]
  return ds.to_iter_dataset().batch(local_batch(config, split, shard_count),
                                    drop_remainder=True)
