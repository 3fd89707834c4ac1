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
# XLA's persistent compilation cache, kept in this checkout's .pytest_cache:
# many tests compile the same program twice (a run and its resumed copy, a
# train command and the eval command after it), and the second compile is
# then a disk read. A fresh clone starts empty, as CI does. The xdist workers
# share it: an entry read while another worker writes it fails its checksum,
# and jax then compiles instead (a warning, not an error).
jax.config.update('jax_compilation_cache_dir', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    '.pytest_cache', 'xla'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
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
