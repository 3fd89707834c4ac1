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
  checkpoint of `init.workdir` (or its older name `dpo.init_workdir`) into
  the policy, as every task does (musicjax/train/warm_start.py), then copies
  it into the reference bit for bit; a resumed run restores its own
  checkpoint, reference included.
* Pairs (`dpo.pairs`, written by `musicjax prefs`) and their batches:
  musicjax/lm/dpo_pairs.py.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from musicjax.config import ConfigError
from musicjax.lm import dpo_pairs as pairs_lib
from musicjax.lm import model as model_lib
from musicjax.lm import task as task_lib
from musicjax.nn import lora
from musicjax.train import accumulate
from musicjax.train.task import ArraySpec

ConfigDict = ml_collections.ConfigDict

# A batch holds '<side>/<slot key>' arrays of both candidates (dpo_pairs.py).
SIDES = pairs_lib.SIDES
SEQ_KEYS = pairs_lib.SEQ_KEYS


def default_config() -> ConfigDict:
  """The LM's keys, DPO optimizer defaults and the `dpo` section."""
  c = task_lib.default_config()
  o = c.optim
  o.lr = 1e-7                 # seed 001 §3.3.3 (3B model)
  o.warmup_steps = 10
  o.schedule = 'constant'
  o.weight_decay = 0.0        # decay pulls toward zero, not toward the reference
  p = c.dpo = ConfigDict()
  # LM run whose latest checkpoint starts policy + reference: the older name
  # of init.workdir (set one of them).
  p.init_workdir = ''
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
  """Policy (trained), frozen reference, optimizer and step counter. With
  LoRA (config.lora) there is no reference copy: the reference is the
  policy with its adapters at zero, i.e. the base it starts from."""

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    self.model = model_lib.AudioLM(config.model, rngs)
    if lora.enabled(config):
      lora.apply(self.model, config, rngs)
    else:
      # Overwritten by warm_start; a separate init keeps every buffer distinct.
      self.ref = freeze(model_lib.AudioLM(config.model, rngs))
    self.opt = nnx.Optimizer(self.model, task_lib.make_optimizer(
        config.optim, config.train.steps), wrt=task_lib.trainable(config))
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


def dpo_sums(policy: PairLogps, reference: PairLogps,
             beta: float) -> dict[str, jax.Array]:
  """Sums over the pairs of the loss -log σ(β Δ) (eq. 11-13) and of its
  metrics; 'pairs' counts them. Sums, so micro-batches add up (gradient
  accumulation, musicjax/train/accumulate.py)."""
  dg = ((policy.winner_global - reference.winner_global)
        - (policy.loser_global - reference.loser_global))
  dl = ((policy.winner_local - reference.winner_local)
        - (policy.loser_local - reference.loser_local))
  delta = dg + dl
  chosen = beta * ((policy.winner_global + policy.winner_local)
                   - (reference.winner_global + reference.winner_local))
  rejected = beta * ((policy.loser_global + policy.loser_local)
                     - (reference.loser_global + reference.loser_local))
  return {
      'pairs': jnp.sum(jnp.ones_like(delta)),
      'loss': -jnp.sum(jax.nn.log_sigmoid(beta * delta)),
      'reward_margin': jnp.sum(beta * delta),
      'global_margin': jnp.sum(beta * dg),
      'local_margin': jnp.sum(beta * dl),
      'accuracy': jnp.sum((delta > 0).astype(jnp.float32)),
      'chosen_reward': jnp.sum(chosen),
      'rejected_reward': jnp.sum(rejected),
  }


def dpo_from_sums(sums: Mapping[str, jax.Array]):
  """-mean log σ(β Δ) and its metrics (means over the pairs) from `dpo_sums`."""
  n = jnp.maximum(sums['pairs'], 1.0)
  loss = sums['loss'] / n
  metrics = {'loss': loss}
  metrics.update({f'dpo/{k}': v / n for k, v in sums.items() if k != 'pairs'})
  return loss, metrics


def dpo_loss(policy: PairLogps, reference: PairLogps, beta: float):
  """-mean log σ(β Δ) (eq. 11-13) and its metrics."""
  return dpo_from_sums(dpo_sums(policy, reference, beta))


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
    # Candidates are cut to max_frames frames (dpo_pairs.PairExample).
    return pair_log_probs(model, batch, self.config.data.max_frames)

  def _reference_model(self, state: DPOState) -> model_lib.AudioLM:
    if not lora.enabled(self.config):
      return state.ref
    gdef, adapters, rest = nnx.split(state.model, nnx.LoRAParam, ...)
    return nnx.merge(gdef, jax.tree.map(jnp.zeros_like, adapters), rest)

  def _reference(self, state: DPOState, batch) -> PairLogps:
    return jax.lax.stop_gradient(
        self._log_probs(self._reference_model(state), batch))

  def train_step(self, state: DPOState, batch, rng):
    del rng  # pairs carry no randomness
    gdef, params, rest = nnx.split(
        state.model, task_lib.trainable(self.config), ...)
    beta = self.config.dpo.beta
    n = int(self.config.train.grad_accum)
    if n == 1:
      ref = self._reference(state, batch)

      def loss_fn(p):
        pol = self._log_probs(nnx.merge(gdef, p, rest), batch)
        return dpo_loss(pol, ref, beta)

      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
      rdef, rstate = nnx.split(self._reference_model(state))

      def sums(p, mb):   # the reference runs per micro-batch too
        pol = self._log_probs(nnx.merge(gdef, p, rest), mb)
        ref = jax.lax.stop_gradient(
            self._log_probs(nnx.merge(rdef, rstate), mb))
        return dpo_sums(pol, ref, beta)

      axes = {k: v.logical_axes for k, v in
              self.batch_spec(self.config.data.batch_size).items()}
      _, metrics, grads = accumulate.value_and_grad(
          sums, dpo_from_sums, params, batch, n, counts=('pairs',),
          logical_axes=axes)
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

  def init_source(self) -> tuple[str, str]:
    return init_source(self.config)

  def warm_start(self, state: nnx.State, shardings: Any) -> nnx.State:
    """Policy and reference <- the LM weights of `init.workdir`."""
    state = super().warm_start(state, shardings)
    if not lora.enabled(self.config):
      copy_policy_to_reference(state)
    return jax.device_put(state, shardings)

  def pair_source(self):
    if self._pairs is None:
      src = pairs_lib.load_pairs(self.config)
      pairs_lib.check_examples(self.config, src)
      self._pairs = src
    return self._pairs

  def dataset(self, split: str, shard_index: int, shard_count: int):
    return pairs_lib.pair_dataset(self.config, split, shard_index, shard_count,
                                  self.pair_source())


# -------------------------------------------------------------- warm start


def init_source(config: ConfigDict) -> tuple[str, str]:
  """(the LM run DPO starts from, the key naming it): `init.workdir`, or its
  older name `dpo.init_workdir`; DPO needs one."""
  new, old = config.init.workdir, config.dpo.init_workdir
  if new and old and os.path.abspath(os.path.expanduser(new)) != os.path.abspath(
      os.path.expanduser(old)):
    # The older name is often set by the config file (configs/lm/dpo_tiny.py)
    # and the new one on the command line: say how to clear the file's.
    raise ConfigError(f'config.init.workdir={new!r} and its older name '
                      f'config.dpo.init_workdir={old!r} differ: set only '
                      "config.init.workdir (add --config.dpo.init_workdir='' "
                      'if the config file sets the older name)')
  if new:
    return new, 'config.init.workdir'
  if old:
    return old, 'config.dpo.init_workdir'
  raise ConfigError('config.init.workdir (or its older name config.dpo.'
                    'init_workdir) is empty: DPO fine-tunes a trained LM; set '
                    '--config.init.workdir=runs/lm')
