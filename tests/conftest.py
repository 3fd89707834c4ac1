"""Shared test set-up: 8 forced CPU devices for sharding tests.

This must run before anything initialises the JAX backend; single-device tests
are unaffected (computations default to device 0).
"""
import jax

jax.config.update('jax_num_cpu_devices', 8)
