"""The device mesh: axes ('data', 'fsdp', 'tensor') sized from `config.mesh`."""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh
import ml_collections

from musicjax.config import ConfigError

AXES = ('data', 'fsdp', 'tensor')


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict,
                       num_devices: int) -> tuple[int, ...]:
  """Sizes of AXES with the single -1 filled in; checked against the devices."""
  sizes = [int(mesh_config[a]) for a in AXES]
  fill = [a for a, s in zip(AXES, sizes) if s == -1]
  for a, s in zip(AXES, sizes):
    if s != -1 and s < 1:
      raise ConfigError(f'config.mesh.{a} must be -1 or >= 1, got {s}')
  if len(fill) > 1:
    raise ConfigError(f'config.mesh: at most one axis may be -1, got -1 for '
                      f'{", ".join("config.mesh." + a for a in fill)}')
  fixed = math.prod(s for s in sizes if s != -1)
  shown = ' x '.join(f'{a}={s}' for a, s in zip(AXES, sizes))
  if fill:
    if num_devices % fixed:
      raise ConfigError(
          f'config.mesh ({shown}): the fixed axes multiply to {fixed}, which '
          f'does not divide the {num_devices} available devices, so '
          f'config.mesh.{fill[0]}=-1 cannot fill the rest')
    sizes[AXES.index(fill[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'config.mesh ({shown}) has {fixed} devices but jax.device_count() is '
        f'{num_devices}; make config.mesh.data/fsdp/tensor multiply to '
        f'{num_devices}, or set one of them to -1')
  return tuple(sizes)


def axis_type(mesh_config: ml_collections.ConfigDict) -> AxisType:
  name = str(mesh_config.get('axis_type', 'explicit')).lower()
  if name not in ('explicit', 'auto'):
    raise ConfigError(f"config.mesh.axis_type must be 'explicit' or 'auto', "
                      f'got {name!r}')
  return AxisType.Explicit if name == 'explicit' else AxisType.Auto


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: list | None = None) -> Mesh:
  """Builds the mesh; raises ConfigError before any compilation if sizes don't fit.

  `jax.make_mesh` orders devices with mesh_utils, so on a multi-host slice the
  inner (later) axes stay within a host's fast interconnect.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(mesh_config, len(devices))
  kind = axis_type(mesh_config)
  return jax.make_mesh(shape, AXES, axis_types=(kind,) * len(AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch dimension is split (data x fsdp)."""
  return mesh.shape['data'] * mesh.shape['fsdp']
