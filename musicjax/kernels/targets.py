"""Lowering for an accelerator this machine does not have.

`jit(f).trace(...).lower(lowering_platforms=('cuda',))` runs the Pallas GPU
lowerings on a CPU-only machine, which is how tests catch a kernel that no
longer lowers. From jax 0.11 on, the GPU lowerings also ask which GPU they
target (Mosaic GPU emits sm_90a code, Triton reads the compute capability),
and without a GPU that answer comes from an abstract device on an abstract
mesh. `lowering_target(platform)` sets one: an H100 for 'cuda' (the kernels'
Hopper target), nothing for 'tpu' (the Mosaic TPU lowering asks nothing).
"""
from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# What the GPU lowering targets when no GPU is attached.
GPU_KIND = 'NVIDIA H100'
GPU_CORES = 132


def abstract_gpu(kind: str = GPU_KIND, cores: int = GPU_CORES) -> AbstractMesh:
  """A one-device mesh whose device is the GPU `kind`."""
  device = AbstractDevice(device_kind=kind, num_cores=cores, platform='gpu')
  return AbstractMesh((1,), ('target',), (AxisType.Explicit,),
                      abstract_device=device)


@contextlib.contextmanager
def lowering_target(platform: str, gpu_kind: str = GPU_KIND):
  """Context in which `.lower(lowering_platforms=(platform,))` works here."""
  if platform not in ('cuda', 'gpu') or jax.default_backend() == 'gpu':
    yield
    return
  with jax.sharding.use_abstract_mesh(abstract_gpu(gpu_kind)):
    yield


def lower_text(fn, args, platform: str, gpu_kind: str = GPU_KIND) -> str:
  """StableHLO text of `jit(fn)` on `args` (ShapeDtypeStructs) for `platform`."""
  with lowering_target(platform, gpu_kind):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
