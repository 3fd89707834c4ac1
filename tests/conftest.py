"""Shared test set-up: 8 forced CPU devices for sharding tests.

This must run before anything initialises the JAX backend; single-device tests
are unaffected (computations default to device 0).
"""
import os

import jax
import pytest

from tests import toy_task

jax.config.update('jax_num_cpu_devices', 8)
# Tests check behaviour, not speed: LLVM's -O0 code generation cuts XLA:CPU
# compile time (most of this suite's time) by about a third. Subprocesses
# (multi-process tests, notebook kernels) inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()
# No persistent compilation cache: reading XLA:CPU executables back is a known
# source of rare segfaults (jax-ml/jax#28908), and it saved nothing here
# (2026-12-07, jax 0.12.1: test_lm_train + test_codec_resume +
# test_accomp_train 4:40 with it, 4:44 without; notebooks 01 + 02 2:31 with
# it, 2:30 without).
# The trainer's test task lives here, not in the package (tests/toy_task.py).
toy_task.register()


@pytest.fixture(autouse=True)
def _fresh_bad_file_report():
  """The bad-file report is process-global (the trainer logs its count); tests
  sharing a pytest worker must not see each other's bad files."""
  from musicjax.data import audio
  audio.reset_bad_files()
  yield


# The files that take longest go first, so that with `-n 2 --dist loadfile`
# they overlap with the many short files instead of running alone at the end
# (longest-processing-time-first; measured with --durations).
SLOW_FIRST = ('test_notebooks.py', 'test_codec_heartcodec_train.py',
              'test_cli_codec.py', 'test_codec_sharded.py',
              'test_accomp_train.py', 'test_codec_resume.py',
              'test_data_prepare_tokens.py', 'test_export.py', 'test_lm_train.py',
              'test_lm_summaries.py', 'test_packaging.py')


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
