"""The shipped accompaniment configs load, validate and describe what their
docstrings say (the 1B one at the paper's parameter count, built abstractly)."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from musicjax import config as config_lib
from musicjax.accomp import sample as sample_lib
from musicjax.accomp import task as task_lib

ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'accomp')


def _load(name):
  return config_lib.load(os.path.join(ROOT, name))


@pytest.mark.parametrize('name', sorted(os.listdir(ROOT)))
def test_every_config_loads_and_validates(name):
  if not name.endswith('.py'):
    pytest.skip('not a config')
  c = _load(name)
  task_lib.AccompTask(c)          # check_config


def test_curriculum_stage_two_extends_stage_one():
  s1, s2 = _load('tiny.py'), _load('tiny_stage2.py')
  assert s2.model == s1.model                      # same network: warm start
  assert s2.data.max_frames > s1.data.max_frames   # long windows
  assert s2.data.quality.enabled and not s1.data.quality.enabled
  assert s2.init.workdir and not s1.init.workdir
  assert s1.cond.drop_text == s1.cond.drop_reference == 0.5


def test_ar_ablation_differs_only_in_decoding():
  base, ar = _load('tiny.py'), _load('tiny_ar.py')
  assert ar.model.decode == 'ar' and ar.loss.rtd_weight == 0
  flat_b, flat_a = config_lib.flatten(base), config_lib.flatten(ar)
  diff = {k for k in flat_b if flat_b[k] != flat_a[k]}
  assert diff == {'model.decode', 'loss.rtd_weight'}, diff


def test_lada_1b_has_the_papers_size():
  c = _load('lada_1b.py')
  assert c.model.num_codebooks == 1 and c.model.codebook_size == 16384
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: task_lib.AccompState(c, nnx.Rngs(0)).model)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  # Llama-3.2-1B's 16 blocks (~0.97B) + two half-width embedding tables, the
  # text table and 16384-way head; no tied input embedding.
  assert 1.0e9 < n < 1.2e9, n


def test_sampling_order_key_defaults_to_the_released_code_and_passes_through():
  c = _load('tiny.py')
  assert c.sample.temperature_after_filter      # the released LaDA-Band order
  assert sample_lib.sampling_from_config(c.sample).temperature_after_filter
  c.sample.temperature_after_filter = False
  assert not sample_lib.sampling_from_config(c.sample).temperature_after_filter
