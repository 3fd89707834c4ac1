"""LaDA-Band's dual-track bidirectional transformer (seed 003 §3-4, eq. 1).

Every frame is one position: [vocal embedding (D/2) ; accompaniment embedding
(D/2)] concatenated along features, each the sum of its K codebook embeddings
(K = 1 is the paper's single-codebook setting). The accompaniment track has two
extra ids: MASK (to be predicted) and PAD. Two prefix tokens come first, in one
fixed order in training and inference: [text, reference] (the released code
swaps them at inference; we don't). Each is a linear projection of a pooled
embedding, replaced by its learned null vector when dropped (classifier-free
conditioning dropout) or absent.

The backbone is the project's Llama-style stack without causal masking. Heads:
per-codebook accompaniment logits, and a replaced-token-detection head (one
logit per frame and codebook) on the same backbone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.nn import lora
from musicjax.nn import transformer
from musicjax.parallel import rules

PREFIX = ('text', 'reference')   # the fixed order of the prefix tokens


def mask_id(codebook_size: int) -> int:
  return codebook_size


def pad_id(codebook_size: int) -> int:
  return codebook_size + 1


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_codebooks = 1
  c.codebook_size = 1024
  c.text_vocab_size = 1024
  c.embed_init_std = 0.02
  # Codec frames per second of the tokens (checked against the data's
  # dataset.json; benchmarks turn seconds into frames with it).
  c.frame_rate = 62.5
  # 'diffusion': bidirectional masked model (LaDA-Band). 'ar': the ablation of
  # seed 003 table 3, a causal model over the same dual-track frames whose
  # accompaniment input is shifted one frame right, decoded frame by frame.
  c.decode = 'diffusion'
  # Depthwise convolution over frames on the input embeddings, added to them
  # (0 = off, the paper's model). A masked position's own input says nothing,
  # so without it every bit of local context must come through attention,
  # which a small model learns slowly; SoundStorm's Conformer blocks mix
  # neighbours with such convolutions for the same reason.
  c.conv_kernel = 0
  c.backbone = transformer.default_config()
  return c


DECODE_MODES = ('diffusion', 'ar')


def _normal(rngs, shape, std, names):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


def _whole(param) -> jax.Array:
  """A small weight, unsharded where it is used."""
  return rules.shard_activation(param[...], (None,) * param[...].ndim)


class AccompModel(nnx.Module):
  ADAPTABLE = {'heads': (1, 1)}   # one head per codebook (nn/lora.py)

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    k, v, d = int(c.num_codebooks), int(c.codebook_size), int(c.backbone.dim)
    if d % 2:
      raise ValueError(f'backbone.dim must be even (two tracks of dim/2), got {d}')
    self.num_codebooks, self.codebook_size = k, v
    if c.decode not in DECODE_MODES:
      raise ValueError(f'model.decode must be one of {DECODE_MODES}, got {c.decode!r}')
    self.causal = c.decode == 'ar'
    std = float(c.embed_init_std)
    half = d // 2
    self.vocal_embed = _normal(rngs, (k, v + 1, half), std, ('codebook', 'vocab', 'embed'))
    self.accomp_embed = _normal(rngs, (k, v + 2, half), std,
                                ('codebook', 'vocab', 'embed'))
    self.text_embed = _normal(rngs, (int(c.text_vocab_size), d), std, ('vocab', 'embed'))
    self.text_proj = _normal(rngs, (d, d), d ** -0.5, ('embed', 'mlp'))
    self.ref_proj = _normal(rngs, (half, d), half ** -0.5, ('embed', 'mlp'))
    self.null_prefix = _normal(rngs, (len(PREFIX), d), std, (None, 'embed'))
    self.backbone = transformer.Transformer(c.backbone, rngs)
    self.heads = _normal(rngs, (k, d, v), float(c.backbone.init_std),
                         ('codebook', 'embed', 'vocab'))
    self.rtd_head = _normal(rngs, (d, k), float(c.backbone.init_std), ('embed', None))
    self.conv_kernel = int(c.get('conv_kernel', 0))
    if self.conv_kernel:
      if self.conv_kernel % 2 == 0:
        raise ValueError(f'conv_kernel must be odd (centred), got {self.conv_kernel}')
      self.conv = _normal(rngs, (self.conv_kernel, d), self.conv_kernel ** -0.5,
                          (None, 'embed'))

  def track_embedding(self, table: jax.Array, codes: jax.Array) -> jax.Array:
    out = 0.0
    for i in range(self.num_codebooks):
      out = out + rules.take_rows_or_zero(table[i], codes[..., i])
    return out

  def prefix(self, text_ids, text_valid, ref_codes, ref_valid, use_text, use_ref):
    """The two prefix tokens [B, 2, D]: pooled text tags and pooled reference
    frames, each projected, or its learned null when not used."""
    tmask = (text_ids >= 0).astype(jnp.float32)
    temb = rules.take_rows_or_zero(self.text_embed[...], text_ids)
    tpool = jnp.sum(temb * tmask[..., None], 1) / jnp.maximum(
        jnp.sum(tmask, 1, keepdims=True), 1.0)
    rmask = (ref_codes[..., 0] >= 0).astype(jnp.float32)
    remb = self.track_embedding(self.accomp_embed[...], ref_codes)
    rpool = jnp.sum(remb * rmask[..., None], 1) / jnp.maximum(
        jnp.sum(rmask, 1, keepdims=True), 1.0)
    # Weights gathered before use (rules.shard_activation): on an Explicit
    # mesh their 'embed' dim may not stay split over the batch's fsdp axis.
    text = tpool @ _whole(self.text_proj)
    ref = rpool @ _whole(self.ref_proj)
    null = _whole(self.null_prefix)
    text = jnp.where((use_text & text_valid)[:, None], text, null[0])
    ref = jnp.where((use_ref & ref_valid)[:, None], ref, null[1])
    return jnp.stack([text, ref], axis=1)

  def hidden(self, vocal, accomp, valid, prefix) -> jax.Array:
    """Backbone output over the T frames [B, T, D] (prefix positions dropped).
    Bidirectional, or causal for the 'ar' ablation."""
    x = jnp.concatenate([self.track_embedding(self.vocal_embed[...], vocal),
                         self.track_embedding(self.accomp_embed[...], accomp)], -1)
    if self.conv_kernel:
      x = x + self._local_mix(x * valid[..., None].astype(x.dtype))
    x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    b, n = x.shape[:2]
    # ones_like: the prefix's flags laid out like `valid` (Explicit meshes).
    full_valid = jnp.concatenate([jnp.broadcast_to(
        jnp.ones_like(valid[:, :1], bool), (b, prefix.shape[1])), valid], 1)
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    h, _ = self.backbone(x, positions,
                         transformer.causal_mask(full_valid, causal=self.causal))
    return h[:, prefix.shape[1]:]

  def _local_mix(self, x: jax.Array) -> jax.Array:
    """Depthwise convolution over frames, 'same' padding; causal (only past
    and current frames) for the 'ar' model."""
    k = self.conv_kernel
    w = _whole(self.conv)
    t = x.shape[1]
    if self.causal:
      xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
      return sum(xp[:, i:i + t] * w[i] for i in range(k))
    h = k // 2
    xp = jnp.pad(x, ((0, 0), (h, h), (0, 0)))
    return sum(xp[:, i:i + t] * w[i] for i in range(k))

  def logits(self, h: jax.Array) -> jax.Array:
    """[B, T, D] -> accompaniment logits [B, T, K, V]."""
    w = rules.shard_activation(lora.read(self, 'heads'), (None, None, 'vocab'))
    out = jnp.einsum('btd,kdv->btkv', h, w).astype(jnp.float32)
    # Whole vocabularies: the losses gather each target's logit.
    return rules.shard_activation(out, ('batch', None, None, None))

  def rtd_logits(self, h: jax.Array) -> jax.Array:
    """[B, T, D] -> replaced-token-detection logits [B, T, K]."""
    return (h @ _whole(self.rtd_head)).astype(jnp.float32)
