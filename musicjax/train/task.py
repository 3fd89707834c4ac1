"""The contract between the generic trainer and a model family.

The trainer owns the mesh, sharding, jit, checkpoints, metrics, data iteration,
preemption and the non-finite guard. A task owns everything model-specific:

  * `default_config()`: the task's own config keys (model/optim/loss/...), merged
    into the schema that validates every config file.
  * `saved_config_defaults()`: optional; for keys a run saved before they
    existed lacks, the values that keep its old behaviour.
  * `create_state(rngs)`: builds the whole train state as one `nnx.Module`
    (models, optimizers, counters). Parameters carry logical axis names via
    `nnx.Param(..., out_sharding=(...))`; the trainer evaluates it abstractly
    first and turns those names into shardings with the config's rule table.
  * `train_step(state, batch, rng) -> metrics`: mutates `state` in place (NNX
    style) and returns a flat dict of scalar metrics. A GAN does its two
    optimizer updates inside; the trainer never knows.
  * `eval_step(state, batch, rng) -> metrics`: must not mutate state.
  * `batch_spec(batch_size)`: name -> (shape, dtype, logical axes) of a global
    batch, so the trainer can shard it before any data arrives.
  * `summaries(state, batch, rng) -> dict`: optional host-side audio/images.
  * `warm_start(state, shardings)`: a fresh run starts from what it returns;
    resumed runs skip it. The default (musicjax/train/warm_start.py, the same
    for every task) restores `warm_start_subtrees` from `config.init.workdir`
    after checking the network is the same; a task declares the data
    (`warm_start_subtrees`, `warm_start_tasks`, `arch_sections`,
    `free_model_keys`) and may finish the state (DPO copies its reference).
  * `supports_grad_accum`: whether `train_step` splits the batch into
    `config.train.grad_accum` micro-batches (musicjax/train/accumulate.py).
  * `dataset(split, shard_index, shard_count)`: a Grain IterDataset of this
    process's share of each global batch, as numpy dicts matching
    `batch_spec`. The default reads audio with `musicjax.data.pipeline`.

Every function given to the trainer is traced once under `jax.jit`; no Python
runs per step inside it.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicjax.data import pipeline


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  shape: tuple[int, ...]
  dtype: Any
  logical_axes: tuple[str | None, ...]


class Task(abc.ABC):
  """A model family as the trainer sees it."""

  name: str = ''
  # Metrics shown on the progress line (all of them go to metrics.jsonl).
  progress_metrics: tuple[str, ...] = ('loss',)
  # Warm start (musicjax/train/warm_start.py): the state subtrees a fresh run
  # takes from `config.init.workdir`; the tasks whose runs hold them (() = this
  # one); the config sections describing that network; the config.model keys
  # that change neither the weights' shapes nor the function they compute.
  warm_start_subtrees: tuple[str, ...] = ('model',)
  warm_start_tasks: tuple[str, ...] = ()
  arch_sections: tuple[str, ...] = ('model',)
  free_model_keys: tuple[str, ...] = ()
  # Whether train_step implements config.train.grad_accum > 1 exactly.
  supports_grad_accum: bool = False
  # Whether create_state adds config.lora's adapters and its optimizer trains
  # only them (musicjax/nn/lora.py, musicjax/train/adapter_runs.py).
  supports_lora: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  @abc.abstractmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """Task keys (sections model/optim/loss/...) with their defaults."""

  @classmethod
  def saved_config_defaults(cls) -> Mapping[str, Any]:
    """{'a.b': value} for keys added after some runs were saved, where the
    behaviour before the key existed differs from `default_config()`'s.

    `config.load_saved` gives a saved run that lacks such a key this value
    instead of the default, so old checkpoints and exports behave as before.
    """
    return {}

  @abc.abstractmethod
  def create_state(self, rngs: nnx.Rngs) -> nnx.Module:
    """The full train state. Called under `nnx.eval_shape` and under `jax.jit`."""

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    """Shapes, dtypes and logical axes of one global batch."""

  @abc.abstractmethod
  def train_step(self, state: nnx.Module, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> dict[str, jax.Array]:
    """One optimisation step: update `state` in place, return scalar metrics."""

  @abc.abstractmethod
  def eval_step(self, state: nnx.Module, batch: Mapping[str, jax.Array],
                rng: jax.Array) -> dict[str, jax.Array]:
    """Scalar metrics on one eval batch; `state` is not modified."""

  def dataset(self, split: str, shard_index: int, shard_count: int):
    """Host-local batches for `split` ('train' repeats forever; 'eval' is
    deterministic). Its iterator state is saved in every checkpoint."""
    return pipeline.audio_dataset(self.config, split, shard_index, shard_count)

  def finalize_metrics(self, averaged: dict[str, float]) -> dict[str, float]:
    """Metrics averaged over steps/batches -> what is logged. For metrics
    that are not means (e.g. perplexity = exp(mean cross-entropy))."""
    return averaged

  def init_source(self) -> tuple[str, str]:
    """(the run a fresh run starts from, or '', the config key naming it)."""
    return self.config.init.workdir, 'config.init.workdir'

  def warm_start(self, state: nnx.State, shardings: Any) -> nnx.State:
    """Called once on a fresh run (no checkpoint yet) with the initialised,
    sharded state; returns the state to train from: `warm_start_subtrees`
    from `init_source()`'s run (musicjax/train/warm_start.py), or `state`
    unchanged without one."""
    from musicjax.train import warm_start as warm_start_lib  # imports trainer
    return warm_start_lib.apply(self, state, shardings)

  def inference_model(self, state: nnx.Module) -> nnx.Module:
    """The module that encode/decode/generate commands run (e.g. the generator)."""
    raise NotImplementedError(f'task {self.name!r} has no inference model')

  def summaries(self, state: nnx.Module, batch: Mapping[str, np.ndarray],
                rng: jax.Array) -> dict[str, Any]:
    """Optional host-side summaries: {'audio/x': (wave [T], sr), 'image/y': HxWx3}."""
    del state, batch, rng
    return {}
