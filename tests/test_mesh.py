"""Mesh construction, logical-axis rules and sharded training on 8 CPU devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.parallel import mesh as mesh_lib
from musicjax.parallel import rules as rules_lib
from musicjax.train import trainer

TOY = os.path.join(os.path.dirname(__file__), 'configs', 'toy.py')


def toy_config(*overrides):
  return config_lib.load(TOY, list(overrides))


def mesh_cfg(data, fsdp, tensor, axis_type='explicit'):
  c = config_lib.base_config().mesh
  c.data, c.fsdp, c.tensor, c.axis_type = data, fsdp, tensor, axis_type
  return c


def test_minus_one_fills_the_rest():
  assert mesh_lib.resolve_mesh_shape(mesh_cfg(-1, 2, 1), 8) == (4, 2, 1)
  assert mesh_lib.resolve_mesh_shape(mesh_cfg(2, 1, -1), 8) == (2, 1, 4)
  m = mesh_lib.make_mesh(mesh_cfg(2, -1, 1, 'auto'))
  assert dict(m.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert m.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize('sizes,needle', [
    ((3, 1, 1), 'jax.device_count() is 8'),
    ((-1, 3, 1), 'config.mesh.data=-1'),
    ((-1, -1, 1), 'config.mesh.data, config.mesh.fsdp'),
    ((2, 0, 4), 'config.mesh.fsdp must be'),
])
def test_bad_mesh_names_the_key(sizes, needle):
  with pytest.raises(ConfigError, match='config.mesh') as e:
    mesh_lib.make_mesh(mesh_cfg(*sizes))
  assert needle in str(e.value)


def test_bad_batch_names_the_key():
  c = toy_config('mesh.data=4', 'mesh.fsdp=2', 'data.batch_size=12')
  with pytest.raises(ConfigError, match=r'config\.data\.batch_size=12 .*8'):
    trainer.setup(c)
  c = toy_config('mesh.data=8', 'data.eval_batch_size=4')
  with pytest.raises(ConfigError, match=r'config\.data\.eval_batch_size=4'):
    trainer.setup(c)


def test_rule_table_semantics():
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 2, 2))
  rules = rules_lib.normalize_rules((
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('embed', 'tensor'),
      ('mlp', 'tensor'), ('time', None)))
  spec = lambda names, shape: rules_lib.logical_to_spec(names, shape, mesh, rules)
  assert spec(('batch', 'time'), (8, 5)) == P(('data', 'fsdp'), None)
  # 'fsdp' already taken by batch: embed falls back to its second rule.
  assert spec(('batch', 'embed'), (8, 4)) == P(('data', 'fsdp'), 'tensor')
  # Both embed rules used up -> replicated, no error.
  assert spec(('embed', 'mlp', 'embed'), (4, 4, 4)) == P('fsdp', 'tensor', None)
  # A mesh axis that doesn't divide the dimension is dropped, not an error.
  assert spec(('batch', 'embed'), (6, 3)) == P('data', None)
  with pytest.raises(ConfigError, match="'heads' has no entry in config.sharding.rules"):
    spec(('heads',), (4,))
  # Mesh axes of size 1 are dropped.
  m1 = mesh_lib.make_mesh(mesh_cfg(8, 1, 1))
  assert rules_lib.logical_to_spec(('batch', 'embed'), (8, 4), m1, rules) == P('data', None)


def test_bad_rules_name_the_key():
  with pytest.raises(ConfigError, match=r'config\.sharding\.rules\[1\].*unknown mesh axis'):
    rules_lib.normalize_rules((('batch', 'data'), ('embed', 'model')))
  with pytest.raises(ConfigError, match=r'config\.sharding\.rules\[0\] must be a pair'):
    rules_lib.normalize_rules((('batch',),))


def _train_steps(config, devices, n=3):
  s = trainer.setup(config, devices)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    step_fn = trainer.make_train_step(s)
    it = iter(s.task.dataset('train', 0, 1))
    spec = s.task.batch_spec(config.data.batch_size)
    losses = []
    for i in range(1, n + 1):
      batch = trainer.global_batch(next(it), spec, s.batch_shardings)
      state, m, bad = step_fn(state, batch, np.int32(i))
      losses.append(float(m['loss']))
      assert not bool(bad)
  pure = nnx.to_pure_dict(state['model'])
  params = {k: np.asarray(v) for k, v in pure.items()}
  shardings = {k: v.sharding for k, v in pure.items()}
  return s, params, losses, shardings


_EXPECTED = {
    (2, 4, 1): {'w1': P('fsdp', None), 'b1': P(None), 'w2': P(None, 'fsdp'), 'b2': P('fsdp')},
    (4, 2, 1): {'w1': P('fsdp', None), 'b1': P(None), 'w2': P(None, 'fsdp'), 'b2': P('fsdp')},
    (1, 2, 4): {'w1': P('fsdp', 'tensor'), 'b1': P('tensor'), 'w2': P('tensor', 'fsdp'),
                'b2': P('fsdp')},
    (1, 4, 2): {'w1': P('fsdp', 'tensor'), 'b1': P('tensor'), 'w2': P('tensor', 'fsdp'),
                'b2': P('fsdp')},
}


@pytest.fixture(scope='module')
def single_device_run():
  c = toy_config('mesh.data=1', 'data.batch_size=8')
  return _train_steps(c, jax.devices()[:1])


@pytest.mark.parametrize('axis_type', ['explicit', 'auto'])
@pytest.mark.parametrize('sizes', list(_EXPECTED))
def test_sharded_training_matches_one_device(sizes, axis_type, single_device_run):
  d, f, t = sizes
  c = toy_config(f'mesh.data={d}', f'mesh.fsdp={f}', f'mesh.tensor={t}',
                 f'mesh.axis_type={axis_type}')
  s, params, losses, _ = _train_steps(c, None)
  want = _EXPECTED[sizes]
  got = rules_lib.describe(s.state_shardings)
  for name, spec in want.items():
    assert got[f'model/{name}'] == str(spec), name
    # Adam moments follow their parameter.
    assert got[f'optimizer/opt_state/0/mu/{name}'] == str(spec), name
  assert got['optimizer/step'] == str(P())
  # Batch is split over data x fsdp; its 'embed' dim can't reuse fsdp.
  bspec = s.batch_shardings['x'].spec
  assert bspec[0] == (('data', 'fsdp') if d > 1 else 'fsdp') and bspec[1] is None
  _, ref_params, ref_losses, _ = single_device_run
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for k in ref_params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('axis_type', ['explicit', 'auto'])
def test_shard_activation(axis_type):
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 4, 1, axis_type))
  rules = rules_lib.normalize_rules(config_lib.base_config().sharding.rules)

  @jax.jit
  def f(x):
    return rules_lib.shard_activation(x * 2, ('batch', 'embed'))

  with jax.set_mesh(mesh), rules_lib.use_rules(rules):
    y = f(jnp.ones((8, 4)))
  want = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'), None))
  assert y.sharding.is_equivalent_to(want, 2), y.sharding
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))
  # Outside any rules context it's the identity.
  np.testing.assert_array_equal(rules_lib.shard_activation(jnp.ones(3), ('batch',)), 1)


def test_reshape_keeps_the_batch_split_through_channel_folds():
  """rules.reshape on an Explicit mesh: batch x channels folded into rows and
  unfolded again stay split over the batch's axes (no gather), and the
  values are plain reshapes."""
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 4, 1, 'explicit'))
  x = np.arange(8 * 2 * 6 * 3, dtype=np.float32).reshape(8, 2, 6, 3)

  @jax.jit
  def f(x):
    rows = rules_lib.reshape(x, (16, 6, 3))          # merge batch x channels
    back = rules_lib.reshape(rows, (8, 2, 18))       # split, merge the rest
    odd = rules_lib.reshape(rows, (2, 8, 18))        # 2 rows can't split 8 ways
    return rows, back, odd

  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P(('data', 'fsdp')))
    rows, back, odd = f(xs)
  batch = P(('data', 'fsdp'))
  for y in (rows, back):
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, batch),
                                       y.ndim), y.sharding
  assert odd.sharding.is_fully_replicated, odd.sharding
  np.testing.assert_array_equal(rows, x.reshape(16, 6, 3))
  np.testing.assert_array_equal(back, x.reshape(8, 2, 18))
  np.testing.assert_array_equal(odd, x.reshape(2, 8, 18))
