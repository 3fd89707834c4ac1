"""Checkpoints restore exactly onto other meshes; the Grain iterator state too."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.parallel import rules as rules_lib
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import runs
from musicjax.train import trainer

TOY = os.path.join(os.path.dirname(__file__), 'configs', 'toy.py')


def _setup(data, fsdp, tensor, devices=None, axis_type='explicit'):
  c = config_lib.load(TOY, [f'mesh.data={data}', f'mesh.fsdp={fsdp}',
                            f'mesh.tensor={tensor}', f'mesh.axis_type={axis_type}'])
  return trainer.setup(c, devices)


def _leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def test_restore_onto_other_meshes_is_exact(tmp_path):
  src = _setup(2, 4, 1)
  with jax.set_mesh(src.mesh), rules_lib.use_rules(src.rules):
    state = trainer.init_state(src)
    step_fn = trainer.make_train_step(src)
    it = iter(src.task.dataset('train', 0, 1))
    spec = src.task.batch_spec(8)
    for i in (1, 2):  # non-trivial optimizer moments
      state, _, _ = step_fn(state, trainer.global_batch(next(it), spec,
                                                        src.batch_shardings),
                            np.int32(i))
    want = _leaves(state)
    manager = ckpt_lib.make_manager(str(tmp_path), keep=2, async_save=True)
    ckpt_lib.save(manager, 2, state, it, meta={'nonfinite_skipped': 1})
    manager.wait_until_finished()
  next_batch = next(it)

  for dst, expect_spec in [(_setup(1, 4, 2, axis_type='auto'), "P('fsdp', 'tensor')"),
                           (_setup(1, 1, 1, jax.devices()[:1]), 'P(None, None)')]:
    manager = ckpt_lib.make_manager(str(tmp_path), keep=2, async_save=False)
    it2 = iter(dst.task.dataset('train', 0, 1))
    with jax.set_mesh(dst.mesh):
      restored = ckpt_lib.restore(manager, 2, dst.abstract_state,
                                  dst.state_shardings, it2)
    got = _leaves(restored)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    w1 = restored['model']['w1'][...]
    assert str(w1.sharding.spec) == expect_spec
    assert w1.sharding.mesh.shape == dst.mesh.shape
    assert ckpt_lib.restore_meta(manager, 2) == {'nonfinite_skipped': 1}
    # The data iterator continues where the saved one stopped.
    nxt = next(it2)
    for k in next_batch:
      np.testing.assert_array_equal(nxt[k], next_batch[k])
    manager.close()


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path):
  c = config_lib.load(TOY)
  with pytest.raises(ConfigError, match='no checkpoint in .*checkpoints'):
    trainer.evaluate(c, str(tmp_path))
  with pytest.raises(ConfigError, match='no checkpoint'):
    runs.load_run(str(tmp_path), config=c)


def test_weights_only_checkpoint_restores_quietly(tmp_path, capfd, caplog):
  """A checkpoint without data position or meta (as `import-torch` writes):
  restore starts the data from the beginning, says so, and orbax logs no
  "could not be restored" warning per item (notebooks showed walls of them)."""
  s = _setup(1, 1, 1, jax.devices()[:1])
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    manager = ckpt_lib.make_manager(str(tmp_path), keep=1, async_save=False)
    ckpt_lib.save(manager, 1, state, None)
    manager.wait_until_finished()
    manager.close()
    # A new manager, as a later process has: it knows no handlers yet.
    manager = ckpt_lib.make_manager(str(tmp_path), keep=1, async_save=False)
    assert ckpt_lib.has_item(manager, 1, 'state')
    assert not ckpt_lib.has_item(manager, 1, 'data')
    assert ckpt_lib.restore_meta(manager, 1) == {}
    it = iter(s.task.dataset('train', 0, 1))
    restored = ckpt_lib.restore(manager, 1, s.abstract_state, s.state_shardings, it)
    manager.close()
  want, got = _leaves(state), _leaves(restored)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  first = next(it)
  fresh = next(iter(s.task.dataset('train', 0, 1)))
  for k in first:
    np.testing.assert_array_equal(first[k], fresh[k])
  err = capfd.readouterr().err
  assert 'no data position' in err
  assert 'could not be restored' not in err
  assert not [r for r in caplog.records if 'could not be restored' in r.getMessage()]
