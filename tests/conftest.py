"""Shared test set-up: 8 forced CPU devices for sharding tests.

This must run before anything initialises the JAX backend; single-device tests
are unaffected (computations default to device 0).
"""
import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)


@pytest.fixture(autouse=True)
def _fresh_bad_file_report():
  """The bad-file report is process-global (the trainer logs its count); tests
  sharing a pytest worker must not see each other's bad files."""
  from musicjax.data import audio
  audio.reset_bad_files()
  yield
