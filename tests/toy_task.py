"""A tiny MLP regression task: the trainer's test vehicle (fast on 1 CPU core).

Registered as task 'toy' by the tests only (conftest.py, configs/toy.py):
`register()` names it by import path, so that the trainer, `load_run` and a
`musicjax train` subprocess (PYTHONPATH = the checkout) all find it.

It exercises every part of the task contract: logical-axis parameters
('embed', 'mlp'), an optax optimizer in the state, a deterministic Grain
dataset with checkpointable iterator state, eval, and summaries.

`toy.nonfinite_steps` (list of 1-based train steps) poisons those steps' batches
with NaN so the loss is non-finite there; it tests the trainer's guard. The
poison travels in the batch (field 'poison'), because batch k is always consumed
by step k+1, also after a resume.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicjax import tasks
from musicjax.parallel.rules import matmul, shard_activation
from musicjax.train.task import ArraySpec, Task


class MLP(nnx.Module):
  """x -> gelu(x W1 + b1) W2 + b2, with logically named axes."""

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.w1 = nnx.Param(init(rngs.params(), (dim, hidden)),
                        out_sharding=('embed', 'mlp'))
    self.b1 = nnx.Param(jnp.zeros((hidden,)), out_sharding=('mlp',))
    self.w2 = nnx.Param(init(rngs.params(), (hidden, dim)),
                        out_sharding=('mlp', 'embed'))
    self.b2 = nnx.Param(jnp.zeros((dim,)), out_sharding=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    # FSDP: gather the 'embed' (fsdp-sharded) dim of each weight for compute;
    # the 'mlp' (tensor-parallel) dim stays sharded. Explicit meshes need this.
    w1 = shard_activation(self.w1[...], (None, 'mlp'))
    w2 = shard_activation(self.w2[...], ('mlp', None))
    h = shard_activation(jax.nn.gelu(x @ w1 + self.b1[...]), ('batch', 'mlp'))
    # Contracting the tensor-parallel 'mlp' dim: the output layout is explicit.
    return matmul(h, w2, ('batch', None)) + shard_activation(self.b2[...], (None,))


class ToyState(nnx.Module):
  def __init__(self, dim: int, hidden: int, lr: float, rngs: nnx.Rngs):
    self.model = MLP(dim, hidden, rngs)
    self.optimizer = nnx.Optimizer(self.model, optax.adam(lr), wrt=nnx.Param)


def _example(index: int, dim: int, seed: int, w_true: np.ndarray) -> dict:
  rng = np.random.default_rng([seed, index])
  x = rng.standard_normal(dim).astype(np.float32)
  y = np.tanh(x @ w_true).astype(np.float32)
  return {'x': x, 'y': y}


class ToyTask(Task):
  name = 'toy'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({'dim': 16, 'hidden': 32})
    c.optim = ml_collections.ConfigDict({'learning_rate': 1e-2})
    c.toy = ml_collections.ConfigDict()
    c.toy.num_examples = 4096     # size of the synthetic train set
    c.toy.num_eval_examples = 256
    c.toy.nonfinite_steps = ()    # 1-based train steps whose loss is NaN
    c.toy.batch_delay_ms = 0.0    # host-side delay per batch (slow-data tests)
    return c

  def create_state(self, rngs: nnx.Rngs) -> ToyState:
    m = self.config.model
    return ToyState(m.dim, m.hidden, self.config.optim.learning_rate, rngs)

  def inference_model(self, state: ToyState) -> MLP:
    return state.model

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    d = self.config.model.dim
    return {
        'x': ArraySpec((batch_size, d), np.float32, ('batch', 'embed')),
        'y': ArraySpec((batch_size, d), np.float32, ('batch', 'embed')),
        'poison': ArraySpec((batch_size,), np.float32, ('batch',)),
    }

  def _loss(self, model: MLP, batch: Mapping[str, jax.Array]) -> jax.Array:
    err = model(batch['x']) - batch['y']
    return jnp.mean(err ** 2) + jnp.mean(batch['poison'])

  def train_step(self, state: ToyState, batch, rng) -> dict[str, jax.Array]:
    del rng
    loss, grads = nnx.value_and_grad(self._loss)(state.model, batch)
    state.optimizer.update(state.model, grads)
    return {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  def eval_step(self, state: ToyState, batch, rng) -> dict[str, jax.Array]:
    del rng
    return {'loss': self._loss(state.model, batch)}

  def dataset(self, split: str, shard_index: int, shard_count: int):
    c = self.config
    dim, batch = c.model.dim, c.data.batch_size
    if split == 'eval':
      batch, n, seed = c.data.eval_batch_size, c.toy.num_eval_examples, 1
    else:
      n, seed = c.toy.num_examples, 0
    local = batch // shard_count
    w_true = np.random.default_rng(c.train.seed + 1234).standard_normal(
        (dim, dim)).astype(np.float32) / np.sqrt(dim)
    poison = set(int(s) for s in c.toy.nonfinite_steps) if split == 'train' else set()
    ds = grain.MapDataset.range(n).map(
        lambda i: _example(int(i), dim, seed + 7 * c.data.shuffle_seed, w_true))
    ds = ds.shuffle(seed=c.data.shuffle_seed + seed).repeat()
    ds = ds[shard_index::shard_count].batch(local, drop_remainder=True)

    delay = c.toy.batch_delay_ms / 1000.0

    def add_poison(index: int, b: dict) -> dict:
      if delay:
        time.sleep(delay)  # never changes values, only timing
      value = np.nan if index + 1 in poison else 0.0
      return {**b, 'poison': np.full((local,), value, np.float32)}
    return ds.map_with_index(add_poison).to_iter_dataset()

  def summaries(self, state: ToyState, batch, rng) -> dict[str, Any]:
    """A weight image and a tone whose loudness follows the weights' scale.

    Runs on every process; arrays sharded across processes are gathered first.
    """
    del batch, rng
    w = _to_host(state.model.w1[...])
    img = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
    t = np.arange(1600) / 16000.0
    wave = 0.3 * np.tanh(np.abs(w).mean()) * np.sin(2 * np.pi * 440 * t)
    return {'audio/toy_tone': (wave.astype(np.float32), 16000),
            'image/w1': np.repeat(img[:, :, None], 3, axis=2)}


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def register() -> None:
  tasks.register('toy', 'tests.toy_task:ToyTask')
