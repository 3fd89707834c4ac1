"""JAX state path <-> PyTorch tensor name and layout, one table per family.

Export and import both read these tables; `musicjax_torch` names its modules'
tensors to match. A rule is (JAX path regex, torch name template, layout):
  * the regex is matched against the '/'-joined nnx state path
    ('backbone/layers/attn/wq'); its groups fill {0}, {1}, ... in the name;
  * `{i}` in the name splits the array's leading axis into one tensor per
    index (scanned layers -> layers.{i}, stacked codebooks -> .{i});
  * the layout says how the (per-index) array is laid out for PyTorch.

Layouts (JAX -> PyTorch; each is a transpose/reshape, so exact both ways):
  same       unchanged (norm scales, biases, embedding tables [N, E])
  linear     [in, out] -> [out, in] (nn.Linear.weight)
  proj_in    [E, H, D] -> [H*D, E] (q/k/v projections)
  proj_out   [H, D, E] -> [E, H*D] (attention output projection)
  conv       [k, in, out] -> [out, in, k] (nn.Conv1d.weight)
  conv_t     [m, in, s, out] (polyphase) -> [in, out, m*s]
             (nn.ConvTranspose1d.weight; tap u = (m-1-i)*s + j, see below)
  depthwise  [k, C] -> [C, 1, k] (nn.Conv1d(groups=C).weight)

Weight-normalised convs keep g and v (`weight_g` [out], `weight_v` in the
conv layout, norm over every axis but `out`), so a round trip is exact.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

FAMILIES = ('codec', 'lm', 'accomp')


class Rule(NamedTuple):
  pattern: str
  name: str
  layout: str


def _conv_rules(prefix: str) -> list[Rule]:
  return [Rule(prefix + r'/v', '{0}.weight_v', 'conv'),
          Rule(prefix + r'/g', '{0}.weight_g', 'same'),
          Rule(prefix + r'/bias', '{0}.bias', 'same')]


def _slash_to_dot(path: str) -> str:
  return path.replace('/', '.')


CODEC = [
    # Transposed convs first: they share the conv rules' path shape.
    Rule(r'(decoder/blocks/\d+/up)/v', '{0}.weight_v', 'conv_t'),
    *_conv_rules(r'(.+)'),
    Rule(r'(.+)/alpha', '{0}.alpha', 'same'),
    Rule(r'quantizer/in_v', 'quantizer.codebooks.{i}.in_proj.weight_v', 'linear'),
    Rule(r'quantizer/in_g', 'quantizer.codebooks.{i}.in_proj.weight_g', 'same'),
    Rule(r'quantizer/in_b', 'quantizer.codebooks.{i}.in_proj.bias', 'same'),
    Rule(r'quantizer/out_v', 'quantizer.codebooks.{i}.out_proj.weight_v', 'linear'),
    Rule(r'quantizer/out_g', 'quantizer.codebooks.{i}.out_proj.weight_g', 'same'),
    Rule(r'quantizer/out_b', 'quantizer.codebooks.{i}.out_proj.bias', 'same'),
    Rule(r'quantizer/codebook', 'quantizer.codebooks.{i}.codebook', 'same'),
    Rule(r'quantizer/cluster_size', 'quantizer.codebooks.{i}.cluster_size', 'same'),
    Rule(r'quantizer/embed_sum', 'quantizer.codebooks.{i}.embed_sum', 'same'),
    Rule(r'quantizer/initialized', 'quantizer.initialized', 'same'),
]


def _stack_rules(stack: str) -> list[Rule]:
  """A `nn.transformer.Transformer` at `stack` (layers scanned on axis 0)."""
  layer = stack + '.layers.{i}.'
  base = stack + r'/layers/'
  return [
      Rule(base + r'attn/wq', layer + 'attn.q_proj.weight', 'proj_in'),
      Rule(base + r'attn/wk', layer + 'attn.k_proj.weight', 'proj_in'),
      Rule(base + r'attn/wv', layer + 'attn.v_proj.weight', 'proj_in'),
      Rule(base + r'attn/wo', layer + 'attn.o_proj.weight', 'proj_out'),
      Rule(base + r'attn_norm/scale', layer + 'attn_norm.weight', 'same'),
      Rule(base + r'mlp_norm/scale', layer + 'mlp_norm.weight', 'same'),
      Rule(base + r'mlp/gate', layer + 'mlp.gate_proj.weight', 'linear'),
      Rule(base + r'mlp/up', layer + 'mlp.up_proj.weight', 'linear'),
      Rule(base + r'mlp/down', layer + 'mlp.down_proj.weight', 'linear'),
      Rule(stack + r'/norm/scale', stack + '.norm.weight', 'same'),
  ]


LM = [
    *_stack_rules('backbone'),
    *_stack_rules('local'),
    Rule(r'audio_embed', 'audio_embed.{i}.weight', 'same'),
    Rule(r'text_embed', 'text_embed.weight', 'same'),
    Rule(r'melody_embed', 'melody_embed.weight', 'same'),
    Rule(r'ref_proj', 'ref_proj.weight', 'linear'),
    # The released HeartMuLa's layout (configs/lm/heartmula_oss_3b.py).
    Rule(r'ref_bias', 'ref_proj.bias', 'same'),
    Rule(r'uncond_embed', 'uncond_embed', 'same'),
    Rule(r'head0', 'head0.weight', 'linear'),
    Rule(r'local_proj', 'local_proj.weight', 'linear'),
    Rule(r'local_heads', 'local_heads.{i}.weight', 'linear'),
    Rule(r'heads', 'heads.{i}.weight', 'linear'),
]

ACCOMP = [
    *_stack_rules('backbone'),
    Rule(r'vocal_embed', 'vocal_embed.{i}.weight', 'same'),
    Rule(r'accomp_embed', 'accomp_embed.{i}.weight', 'same'),
    Rule(r'text_embed', 'text_embed.weight', 'same'),
    Rule(r'text_proj', 'text_proj.weight', 'linear'),
    Rule(r'ref_proj', 'ref_proj.weight', 'linear'),
    Rule(r'null_prefix', 'null_prefix', 'same'),
    Rule(r'heads', 'heads.{i}.weight', 'linear'),
    Rule(r'rtd_head', 'rtd_head.weight', 'linear'),
    Rule(r'conv', 'conv.weight', 'depthwise'),
]

TABLES = {'codec': CODEC, 'lm': LM, 'accomp': ACCOMP}


class MappingError(ValueError):
  """A state path with no rule, or a tensor whose shape does not fit."""


def find_rule(family: str, path: str) -> tuple[Rule, tuple[str, ...]]:
  for rule in TABLES[family]:
    m = re.fullmatch(rule.pattern, path)
    if m:
      groups = tuple(_slash_to_dot(g) for g in m.groups())
      return rule, groups
  raise MappingError(f'{family}: no export rule for state {path!r} (add one to '
                     'musicjax/export/mapping.py)')


def torch_names(family: str, path: str, shape: tuple[int, ...]) -> list[str]:
  """The PyTorch tensor name(s) of one JAX state array."""
  rule, groups = find_rule(family, path)
  if '{i}' in rule.name:
    return [rule.name.replace('{i}', str(i)).format(*groups)
            for i in range(shape[0])]
  return [rule.name.format(*groups)]


# ------------------------------------------------------------------ layouts
def _contiguous(x: np.ndarray) -> np.ndarray:
  # Not np.ascontiguousarray: it turns a 0-d array (a flag) into shape [1].
  return x if x.flags.c_contiguous else x.copy(order='C')


def to_torch(layout: str, x: np.ndarray) -> np.ndarray:
  """One (per-index) array in PyTorch layout; contiguous."""
  if layout == 'same':
    y = x
  elif layout == 'linear':
    y = x.T
  elif layout == 'proj_in':
    y = x.reshape(x.shape[0], -1).T
  elif layout == 'proj_out':
    y = x.reshape(-1, x.shape[-1]).T
  elif layout == 'conv':
    y = x.transpose(2, 1, 0)
  elif layout == 'conv_t':
    # Polyphase tap i, phase j is the transposed conv's tap u = (m-1-i)*s + j:
    # the stride-1 correlation over m frames runs the taps in reverse.
    m, cin, s, cout = x.shape
    y = x[::-1].transpose(1, 3, 0, 2).reshape(cin, cout, m * s)
  elif layout == 'depthwise':
    y = x.T[:, None, :]
  else:
    raise MappingError(f'unknown layout {layout!r}')
  return _contiguous(y)


def from_torch(layout: str, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `to_torch` for a JAX array of `shape`."""
  want = to_torch(layout, np.empty(shape, np.uint8)).shape
  if tuple(y.shape) != tuple(want):
    raise MappingError(f'shape {tuple(y.shape)}, expected {tuple(want)}')
  if layout == 'same':
    x = y
  elif layout == 'linear':
    x = y.T
  elif layout in ('proj_in', 'proj_out'):
    x = y.T.reshape(shape)
  elif layout == 'conv':
    x = y.transpose(2, 1, 0)
  elif layout == 'conv_t':
    m, cin, s, cout = shape
    x = y.reshape(cin, cout, m, s).transpose(2, 0, 3, 1)[::-1]
  elif layout == 'depthwise':
    x = y[:, 0, :].T
  else:
    raise MappingError(f'unknown layout {layout!r}')
  return _contiguous(x)


def export_arrays(family: str, path: str, x: np.ndarray) -> dict[str, np.ndarray]:
  """{torch name: array} for one JAX state array."""
  rule, _ = find_rule(family, path)
  names = torch_names(family, path, x.shape)
  if '{i}' in rule.name:
    return {n: to_torch(rule.layout, x[i]) for i, n in enumerate(names)}
  return {names[0]: to_torch(rule.layout, x)}


def import_array(family: str, path: str, shape: tuple[int, ...],
                 get) -> np.ndarray:
  """The JAX array of `shape` at `path`, from `get(torch_name)` tensors."""
  rule, _ = find_rule(family, path)
  names = torch_names(family, path, shape)

  def one(name, sub_shape):
    try:
      return from_torch(rule.layout, get(name), sub_shape)
    except MappingError as e:
      raise MappingError(f'tensor {name!r} (for {path}): {e}') from None

  if '{i}' in rule.name:
    return np.stack([one(n, shape[1:]) for n in names])
  return one(names[0], shape)
