"""Numbers of the HeartCodec decode path, and their mapping from heartlib.

`default_config()` is the released model (HeartCodec-oss) as heartlib runs it:
model numbers from its config.json defaults, decode settings (window, steps,
guidance) from its `detokenize` defaults. configs/codec/heartcodec_oss.py
spells every one out; configs/codec/heartcodec_tiny.py is the test-sized
model of tests/fixtures/heartcodec_tiny/.

A HeartCodec folder's config.json maps onto these keys with
`from_heartlib_config`; keys the decoder never reads (encoder side, VQ
training) are listed in `IGNORED_HEARTLIB_KEYS`.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Iterable

import ml_collections

from musicjax import config as config_lib
from musicjax.config import ConfigError

ConfigDict = ml_collections.ConfigDict

MODEL_TYPE = 'heartcodec'


def default_config() -> ConfigDict:
  """Every number of the released HeartCodec's decode path."""
  c = ConfigDict()
  c.model_type = MODEL_TYPE        # config.json model_type of loadable weights
  c.sample_rate = 48000
  c.code_rate_hz = 12.5            # code frames per second

  q = c.codes = ConfigDict()       # residual VQ lookup (decode side only)
  q.num_quantizers = 8
  q.codebook_size = 8192
  q.codebook_dim = 32              # codes are summed here, then projected
  q.dim = 512
  q.init_std = 1.0                 # random init only (weights are loaded)

  e = c.estimator = ConfigDict()   # flow-matching velocity transformer
  e.in_channels = 1024             # latent + in-context latent + code features
  e.out_channels = 256             # latent channels
  e.num_heads = 24
  e.head_dim = 64                  # stack 2 has the same heads, twice as wide
  e.num_layers = 24
  e.num_layers_2 = 6
  e.mlp_dim = 4096                 # SwiGLU width, stack 1
  e.mlp_dim_2 = 8192               # stack 2
  e.proj_kernel = 3                # conv of the in / connection / out projections
  e.norm_eps = 1e-6                # RMSNorm in blocks, LayerNorm after stacks
  e.rope_theta = 10000.0
  e.timestep_dim = 512             # sinusoidal features of t
  e.timestep_max_period = 10000.0
  e.timestep_scale = 1000.0        # t in [0, 1] is scaled to [0, 1000]
  e.init_std = 0.02
  e.dtype = 'float32'              # matmul dtype (heartlib decodes in float32)
  e.attention_chunk = 0            # queries per attention block (0 = all)

  f = c.flow = ConfigDict()        # Euler sampler and windows
  f.frames_per_code = 2            # 12.5 Hz codes -> 25 Hz latent
  f.num_steps = 10
  f.guidance_scale = 1.25          # > 1: classifier-free guidance
  f.sigma_min = 1e-6               # in-context prefix: x_t = (1-(1-s)t) x0 + t x1
  f.window_codes = 372             # 29.76 s windows ...
  f.hop_codes = 320                # ... every 25.6 s: 4.16 s cross-faded

  s = c.scalar = ConfigDict()      # scalar-quantized waveform decoder
  s.channels = 2                   # the latent's halves are the two channels
  s.latent_dim = 128
  s.levels = 9.0                   # latent rounded to multiples of 1 / levels
  s.init_channel = 64              # channels after the last upsampling block
  s.upsample_factors = (5, 4, 4, 4, 3)
  s.upsample_kernel_sizes = (10, 8, 8, 8, 6)
  s.res_dilations = (1, 3, 5, 7, 9)
  s.res_kernel_size = 7
  s.delay_kernel_size = 5          # the first conv, centred (looks ahead)
  s.kernel_size = 7                # the repeat and output convs
  s.num_samples = 2                # nearest-neighbour repeat before the output
  s.num_bands = 1
  s.causal = True
  s.prelu_init = 0.25
  return c


def samples_per_code(c: ConfigDict) -> int:
  return (int(c.flow.frames_per_code) * math.prod(c.scalar.upsample_factors)
          * int(c.scalar.num_samples))


def check_config(c: ConfigDict) -> None:
  """Raises ConfigError naming the key for an inconsistent config."""
  e, f, s, q = c.estimator, c.flow, c.scalar, c.codes
  want_in = 2 * e.out_channels + q.dim
  if e.in_channels != want_in:
    raise ConfigError(
        f'config.estimator.in_channels={e.in_channels} must be 2 * '
        f'out_channels + codes.dim = {want_in} (noisy latent, in-context '
        'latent and code features are stacked on channels)')
  if s.channels * s.latent_dim != e.out_channels or s.num_bands != 1:
    raise ConfigError(
        f'config.scalar: channels ({s.channels}) x latent_dim ({s.latent_dim}) '
        f'must equal estimator.out_channels ({e.out_channels}), with '
        f'num_bands 1 (got {s.num_bands})')
  if not s.causal:
    raise ConfigError('config.scalar.causal must be True: only the causal '
                      'decoder (HeartCodec-oss) is implemented')
  if len(s.upsample_factors) != len(s.upsample_kernel_sizes) or any(
      k != 2 * r for r, k in zip(s.upsample_factors, s.upsample_kernel_sizes)):
    raise ConfigError(
        f'config.scalar.upsample_kernel_sizes {tuple(s.upsample_kernel_sizes)} '
        f'must be twice upsample_factors {tuple(s.upsample_factors)} (causal '
        'transposed convs)')
  if e.proj_kernel % 2 != 1:
    raise ConfigError(f'config.estimator.proj_kernel must be odd, got '
                      f'{e.proj_kernel}')
  if e.head_dim % 2:
    raise ConfigError(f'config.estimator.head_dim must be even, got {e.head_dim}')
  if not 1 <= f.hop_codes <= f.window_codes:
    raise ConfigError(f'config.flow: need 1 <= hop_codes <= window_codes, got '
                      f'{f.hop_codes} and {f.window_codes}')
  if f.num_steps < 1:
    raise ConfigError(f'config.flow.num_steps must be >= 1, got {f.num_steps}')
  spc = samples_per_code(c)
  if abs(c.sample_rate - c.code_rate_hz * spc) > 1e-6 * c.sample_rate:
    raise ConfigError(
        f'config.sample_rate={c.sample_rate} must be code_rate_hz '
        f'({c.code_rate_hz}) x {spc} samples per code (frames_per_code x '
        'upsample_factors x num_samples)')
  if e.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"config.estimator.dtype must be 'float32' or "
                      f"'bfloat16', got {e.dtype!r}")


def heartlib_mlp_dim(dim: int) -> int:
  """SwiGLU width heartlib's estimator blocks derive from the model width:
  two thirds of 4 * dim, rounded up to a multiple of 256."""
  hidden = int(2 * (4 * dim) / 3)
  return 256 * -(-hidden // 256)


# config.json keys decode never reads: the encoder side of the SQ codec and
# the VQ's training statistics; and Hugging Face bookkeeping.
IGNORED_HEARTLIB_KEYS = (
    'downsample_factors', 'downsample_kernel_sizes', 'decay',
    'commitment_weight', 'threshold_ema_dead_code', 'architectures',
    'transformers_version', 'dtype', 'torch_dtype')

# config.json key -> our key.
_HEARTLIB_KEYS = {
    'dim': 'codes.dim',
    'codebook_size': 'codes.codebook_size',
    'codebook_dim': 'codes.codebook_dim',
    'num_quantizers': 'codes.num_quantizers',
    'attention_head_dim': 'estimator.head_dim',
    'in_channels': 'estimator.in_channels',
    'num_attention_heads': 'estimator.num_heads',
    'num_layers': 'estimator.num_layers',
    'num_layers_2': 'estimator.num_layers_2',
    'out_channels': 'estimator.out_channels',
    'sample_rate': 'sample_rate',
    'num_samples': 'scalar.num_samples',
    'num_bands': 'scalar.num_bands',
    'causal': 'scalar.causal',
    'upsample_factors': 'scalar.upsample_factors',
    'upsample_kernel_sizes': 'scalar.upsample_kernel_sizes',
    'latent_hidden_dim': 'scalar.latent_dim',
    'default_kernel_size': 'scalar.kernel_size',
    'delay_kernel_size': 'scalar.delay_kernel_size',
    'init_channel': 'scalar.init_channel',
    'res_kernel_size': 'scalar.res_kernel_size',
}


def _set(c: ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = tuple(value) if isinstance(value, list) else value


def from_heartlib_config(d: dict[str, Any], base: ConfigDict | None = None,
                         where: str = 'config.json') -> ConfigDict:
  """Our config for heartlib's HeartCodec config.json `d`.

  Keys absent from `d` keep heartlib's defaults (= `default_config()`);
  decode settings (flow.*) come from `base` (default: `default_config()`).
  The two SwiGLU widths follow from the widths as in heartlib.

  Raises:
    ConfigError: naming `where` for another model type or an option this
      decoder does not implement.
  """
  if d.get('model_type') != MODEL_TYPE:
    raise ConfigError(f'{where}: model_type is {d.get("model_type")!r}, not '
                      f'{MODEL_TYPE!r}: not a HeartCodec checkpoint')
  if d.get('norm_type', 'ada_norm_single') != 'ada_norm_single':
    raise ConfigError(f'{where}: norm_type {d["norm_type"]!r} is not '
                      "implemented (only 'ada_norm_single', HeartCodec-oss)")
  if d.get('use_cosine_sim', False):
    raise ConfigError(f'{where}: use_cosine_sim true is not implemented '
                      '(HeartCodec-oss looks codes up by Euclidean distance)')
  c = ml_collections.ConfigDict((base or default_config()).to_dict())
  defaults = default_config()
  for key, ours in _HEARTLIB_KEYS.items():
    _set(c, ours, d[key] if key in d else _get(defaults, ours))
  width = c.estimator.num_heads * c.estimator.head_dim
  c.estimator.mlp_dim = heartlib_mlp_dim(width)
  c.estimator.mlp_dim_2 = heartlib_mlp_dim(2 * width)
  try:
    check_config(c)
  except ConfigError as err:
    raise ConfigError(f'{where}: {err}') from None
  return c


def _get(c: ConfigDict, key: str) -> Any:
  node = c
  for p in key.split('.'):
    node = node[p]
  return node


def load(spec: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """A HeartCodec config file (or shipped name, 'codec/heartcodec_oss') with
  `--config.a.b=value` overrides, checked."""
  path = config_lib.resolve(spec)
  module_spec = importlib.util.spec_from_file_location('_heartcodec_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config()
  c = config_lib.apply_overrides(c, overrides)
  check_config(c)
  return c
