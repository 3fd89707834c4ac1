"""PyTorch mirror of musicjax/nn/transformer.py (Llama-style blocks).

RMSNorm, rotary embeddings in the rotate-half layout (the first and second
halves of each head dimension form the complex pairs), SwiGLU feed-forward and
grouped-query attention (query head h reads KV head h // (H / KV)).

Tensor names match musicjax/export/mapping.py: `layers.{i}.attn.q_proj.weight`
[H*D, E] with head-major rows (row h*D + d), `o_proj.weight` [E, H*D],
`mlp.{gate,up,down}_proj.weight`, `attn_norm.weight`, `mlp_norm.weight`, and
the final `norm.weight`.

Compute runs in the parameters' dtype, except where JAX also widens: norms,
rotary phases, attention scores and softmax are float32. Masked scores are
large and finite (not -inf), so a query with every key masked (a padding slot)
averages uniformly instead of giving NaN, as in JAX.

Positions are explicit integers per token; a KV cache is one (k, v) pair per
layer, each [B, KV, S, D], written in place at a slot index.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

# Same constant as the JAX side: masked logits stay finite.
MASKED = -1e30

LayerCache = tuple[torch.Tensor, torch.Tensor]


# Stack options of musicjax/nn/transformer.py and the values mirrored here
# (the first is the default when a config predates the key); other values
# (e.g. MusicGen's LayerNorm, GELU MLP, cross-attention) are refused.
MIRRORED = {'rope_scaling': ('none', 'llama3'), 'norm': ('rms',),
            'mlp': ('swiglu',), 'positions': ('rope',),
            'cross_attention': (False,)}


def check_config(c: Mapping[str, Any], where: str = 'transformer') -> None:
  """Refuses a stack config this mirror would not compute as JAX does; the
  error names the key (`where` is its path, e.g. 'model.backbone')."""
  for key, allowed in MIRRORED.items():
    value = c.get(key, allowed[0])
    if value not in allowed:
      raise ValueError(f'config {where}.{key} = {value!r}: musicjax_torch '
                       f'mirrors {allowed} only; load this export in JAX '
                       '(musicjax import-torch)')


def head_dim(c: Mapping[str, Any]) -> int:
  """The config's head_dim, where 0 means dim // num_heads."""
  return int(c.get('head_dim', 0)) or int(c['dim']) // int(c['num_heads'])


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


def rope_frequencies(c: Mapping[str, Any], half: int,
                     device: torch.device | None = None) -> torch.Tensor:
  """Angular frequency of each rotated pair: base theta, optionally with
  Llama-3 scaling (config rope_scaling 'llama3'), float32."""
  exponent = -torch.arange(half, dtype=torch.float32, device=device) / half
  freq = torch.pow(torch.tensor(float(c['rope_theta']), dtype=torch.float32,
                                device=device), exponent)
  scaling = c.get('rope_scaling', 'none')
  if scaling == 'none':
    return freq
  if scaling != 'llama3':
    raise ValueError(f"rope_scaling {scaling!r} is not mirrored here ('none' or "
                     "'llama3')")
  factor = float(c['rope_scale_factor'])
  low, high = float(c['rope_low_freq_factor']), float(c['rope_high_freq_factor'])
  context = int(c['rope_original_context'])
  wavelength = 2 * torch.pi / freq
  smooth = (context / wavelength - low) / (high - low)
  blended = (1 - smooth) * freq / factor + smooth * freq
  return torch.where(wavelength < context / high, freq,
                     torch.where(wavelength > context / low, freq / factor,
                                 blended))


def rope(x: torch.Tensor, positions: torch.Tensor,
         freq: torch.Tensor) -> torch.Tensor:
  """Rotary embedding of x [B, T, H, D] at integer positions [B, T], with the
  pairs' frequencies `freq` [D / 2] (rope_frequencies)."""
  half = x.shape[-1] // 2
  angle = positions.float()[..., None, None] * freq            # [B, T, 1, half]
  sin, cos = torch.sin(angle), torch.cos(angle)
  x1, x2 = x[..., :half].float(), x[..., half:].float()
  out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
  return out.to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor) -> torch.Tensor:
  """Grouped-query attention. q [B,T,H,D]; k, v [B,KV,S,D]; mask [B,T,S] or
  [B,1,S] bool. Returns [B,T,H,D]."""
  b, t, h, d = q.shape
  group = h // k.shape[1]
  # Query heads of a group are adjacent (h = kv * group + g), so repeating
  # each KV head `group` times lines KV head h // group up with query head h.
  k = k.repeat_interleave(group, dim=1)
  v = v.repeat_interleave(group, dim=1)
  s = torch.einsum('bthd,bhsd->bhts', q.float(), k.float()) * (d ** -0.5)
  s = torch.where(mask[:, None], s, torch.full_like(s, MASKED))
  p = torch.softmax(s, dim=-1).to(v.dtype)
  return torch.einsum('bhts,bhsd->bthd', p, v)


class Attention(nn.Module):

  def __init__(self, c: Mapping[str, Any]):
    super().__init__()
    e, h, kv = int(c['dim']), int(c['num_heads']), int(c['num_kv_heads'])
    d = head_dim(c)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
    # Recomputed per call in float32 (a buffer would follow .to(bfloat16)).
    self.rope_config = {k: c[k] for k in c if k.startswith('rope_')}
    self.q_proj = nn.Linear(e, h * d, bias=False)
    self.k_proj = nn.Linear(e, kv * d, bias=False)
    self.v_proj = nn.Linear(e, kv * d, bias=False)
    self.o_proj = nn.Linear(h * d, e, bias=False)

  def forward(self, x: torch.Tensor, positions: torch.Tensor,
              mask: torch.Tensor, cache: LayerCache | None = None,
              index: int = 0) -> torch.Tensor:
    """x [B,T,E]; mask [B,T,S] (S = T, or the cache length). With a cache,
    the new keys/values are written at slots [index, index + T) first."""
    b, t, _ = x.shape
    h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
    freq = rope_frequencies(self.rope_config, d // 2, x.device)
    q = rope(self.q_proj(x).view(b, t, h, d), positions, freq)
    k = rope(self.k_proj(x).view(b, t, kv, d), positions, freq)
    v = self.v_proj(x).view(b, t, kv, d)
    k, v = k.transpose(1, 2), v.transpose(1, 2)                 # [B,KV,T,D]
    if cache is not None:
      ck, cv = cache
      ck[:, :, index:index + t] = k.to(ck.dtype)
      cv[:, :, index:index + t] = v.to(cv.dtype)
      k, v = ck.to(x.dtype), cv.to(x.dtype)
    o = attend(q, k, v, mask)
    return self.o_proj(o.reshape(b, t, h * d))


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, c: Mapping[str, Any]):
    super().__init__()
    e, f = int(c['dim']), int(c['mlp_dim'])
    self.gate_proj = nn.Linear(e, f, bias=False)
    self.up_proj = nn.Linear(e, f, bias=False)
    self.down_proj = nn.Linear(f, e, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):

  def __init__(self, c: Mapping[str, Any]):
    super().__init__()
    self.attn_norm = RMSNorm(int(c['dim']), float(c['norm_eps']))
    self.attn = Attention(c)
    self.mlp_norm = RMSNorm(int(c['dim']), float(c['norm_eps']))
    self.mlp = MLP(c)

  def forward(self, x, positions, mask, cache=None, index=0):
    x = x + self.attn(self.attn_norm(x), positions, mask, cache, index)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
  """A stack of `num_layers` blocks and a final RMSNorm, from a dict like the
  JAX `model.backbone` config (keys it does not use, such as init_std or
  remat, are ignored)."""

  def __init__(self, c: Mapping[str, Any], where: str = 'transformer'):
    super().__init__()
    check_config(c, where)
    self.num_kv_heads = int(c['num_kv_heads'])
    self.head_dim = head_dim(c)
    self.layers = nn.ModuleList(Block(c) for _ in range(int(c['num_layers'])))
    self.norm = RMSNorm(int(c['dim']), float(c['norm_eps']))

  def init_cache(self, batch: int, length: int,
                 dtype: torch.dtype | None = None) -> list[LayerCache]:
    """Zeros [B, KV, length, D] for K and V of every layer (the parameters'
    dtype by default: keys and values are computed in it)."""
    ref = self.norm.weight
    dtype = dtype or ref.dtype
    shape = (batch, self.num_kv_heads, length, self.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=ref.device),
             torch.zeros(shape, dtype=dtype, device=ref.device))
            for _ in self.layers]

  def forward(self, x: torch.Tensor, positions: torch.Tensor,
              mask: torch.Tensor, cache: list[LayerCache] | None = None,
              index: int = 0) -> torch.Tensor:
    """x [B,T,E], positions [B,T], mask [B,T,S] -> normed output [B,T,E].
    A cache given is updated in place."""
    for i, layer in enumerate(self.layers):
      x = layer(x, positions, mask, None if cache is None else cache[i], index)
    return self.norm(x)


def causal_mask(valid: torch.Tensor, causal: bool = True) -> torch.Tensor:
  """Mask for a whole sequence: valid keys, and earlier ones if causal.
  [B,T,T] when causal, else [B,1,T]."""
  t = valid.shape[1]
  m = valid[:, None, :]
  if causal:
    m = m & torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()[None]
  return m


def cache_mask(key_valid: torch.Tensor, index: int, num_new: int) -> torch.Tensor:
  """[B,T,S] mask for T new tokens written at `index` into a cache of S
  slots: a query sees valid slots up to and including its own."""
  s = key_valid.shape[1]
  q_slot = index + torch.arange(num_new, device=key_valid.device)
  ok = torch.arange(s, device=key_valid.device)[None, :] <= q_slot[:, None]
  return key_valid[:, None, :] & ok[None]
