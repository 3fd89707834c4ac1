"""PyTorch mirror of the musicjax accompaniment model (musicjax/accomp/model.py)
and its samplers (musicjax/accomp/sample.py, musicjax/accomp/diffusion.py).

LaDA-Band's dual-track transformer: every frame is one position, [vocal
embedding (D/2) ; accompaniment embedding (D/2)], each the sum of its K
codebook embeddings; an optional depthwise convolution over frames is added;
two prefix tokens [text, reference] come first (each a projected pooled
embedding, or its learned null). The backbone is bidirectional, or causal for
the 'ar' ablation. Heads: per-codebook accompaniment logits and a
replaced-token-detection logit per frame and codebook.

Ids: accompaniment MASK = codebook_size, PAD = codebook_size + 1; text and
reference ids of -1 are absent (zero embedding, left out of the pooling).

Tensor names match musicjax/export/mapping.py (ACCOMP): `vocal_embed.{k}`,
`accomp_embed.{k}`, `text_embed` (nn.Embedding), `text_proj`, `ref_proj`,
`heads.{k}`, `rtd_head` (nn.Linear, no bias), `null_prefix` [2, D], the
backbone as musicjax_torch.transformer, and `conv.weight` [D, 1, k] (a
depthwise nn.Conv1d) when conv_kernel > 0.

Sampling (`accompany`) draws its randomness from a noise source (`Noise`):
standard Gumbel noise for the token draw (Gumbel-max, as jax.random.categorical)
and for the remasking scores. Pass `noise=` to feed other noise (e.g. JAX's,
for bit-level parity), or use the deterministic mode: temperature 0 (argmax
tokens) and mask_temperature 0 (no remasking noise). Compute runs in the
parameters' dtype; logits and the sampler run in float32.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from musicjax_torch import transformer

EMPTY = -1
PREFIX = ('text', 'reference')        # the fixed order of the prefix tokens
DECODE_MODES = ('diffusion', 'ar')
# Accompaniment table rows beyond the codes: MASK, then PAD.
ACCOMP_EXTRA_ROWS = 2
# Floor of a sampled token's probability before its log (as JAX: a token cut
# by top-k/top-p rounding never gives log 0).
MIN_CONFIDENCE = 1e-30
# The default sampling settings of the JAX task config (config.sample).
DEFAULT_STEPS, DEFAULT_TOP_K, DEFAULT_TOP_P = 60, 100, 0.9
DEFAULT_MASK_TEMPERATURE = 10.5


def mask_id(codebook_size: int) -> int:
  return codebook_size


def pad_id(codebook_size: int) -> int:
  return codebook_size + 1


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
  """table[ids] with EMPTY (negative) ids giving zero vectors."""
  rows = F.embedding(ids.clamp(min=0), table)
  return rows * (ids >= 0)[..., None].to(rows.dtype)


def _mean_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
  """Mean of x [B, N, E] over positions valid [B, N] (0 when none)."""
  m = valid.to(x.dtype)
  return torch.sum(x * m[..., None], 1) / torch.clamp(
      torch.sum(m, 1, keepdim=True), min=1.0)


# --------------------------------------------------------------------- model
class AccompModel(nn.Module):

  def __init__(self, model: Mapping[str, Any]):
    super().__init__()
    self.config = dict(model)
    self.num_codebooks = k = int(model['num_codebooks'])
    self.codebook_size = v = int(model['codebook_size'])
    bb = model['backbone']
    d = int(bb['dim'])
    if d % 2:
      raise ValueError(f'backbone.dim must be even (two tracks of dim/2), got {d}')
    decode = model.get('decode', 'diffusion')
    if decode not in DECODE_MODES:
      raise ValueError(f'model.decode must be one of {DECODE_MODES}, got {decode!r}')
    self.causal = decode == 'ar'
    self.frame_rate = float(model.get('frame_rate', 0.0))
    half = d // 2
    self.vocal_embed = nn.ModuleList(nn.Embedding(v + 1, half) for _ in range(k))
    self.accomp_embed = nn.ModuleList(
        nn.Embedding(v + ACCOMP_EXTRA_ROWS, half) for _ in range(k))
    self.text_embed = nn.Embedding(int(model['text_vocab_size']), d)
    self.text_proj = nn.Linear(d, d, bias=False)
    self.ref_proj = nn.Linear(half, d, bias=False)
    self.null_prefix = nn.Parameter(torch.zeros(len(PREFIX), d))
    self.backbone = transformer.Transformer(bb, 'model.backbone')
    self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for _ in range(k))
    self.rtd_head = nn.Linear(d, k, bias=False)
    self.conv_kernel = int(model.get('conv_kernel', 0))
    if self.conv_kernel:
      if self.conv_kernel % 2 == 0:
        raise ValueError(f'conv_kernel must be odd (centred), got {self.conv_kernel}')
      self.conv = nn.Conv1d(d, d, self.conv_kernel, groups=d, bias=False)

  @classmethod
  def from_config(cls, meta: Mapping[str, Any]) -> 'AccompModel':
    """From an export's config.json (its `model` plus the loader facts); the
    facts must agree with the id conventions this mirror computes with."""
    v = int(meta['model']['codebook_size'])
    for key, ours in (('mask_id', mask_id(v)), ('pad_id', pad_id(v))):
      if key in meta and int(meta[key]) != ours:
        raise ValueError(f'config.json {key}={meta[key]}, but musicjax_torch '
                         f'uses {ours}: update musicjax_torch')
    return cls(meta['model'])

  @property
  def mask_id(self) -> int:
    return mask_id(self.codebook_size)

  @property
  def pad_id(self) -> int:
    return pad_id(self.codebook_size)

  # ------------------------------------------------------------ embeddings
  def track_embedding(self, tables: nn.ModuleList, codes: torch.Tensor
                      ) -> torch.Tensor:
    """codes [..., K] -> sum of the K codebook embeddings [..., D/2]."""
    out = _lookup(tables[0].weight, codes[..., 0])
    for i in range(1, self.num_codebooks):
      out = out + _lookup(tables[i].weight, codes[..., i])
    return out

  def prefix(self, text_ids: torch.Tensor, text_valid: torch.Tensor,
             ref_codes: torch.Tensor, ref_valid: torch.Tensor,
             use_text: torch.Tensor, use_ref: torch.Tensor) -> torch.Tensor:
    """The two prefix tokens [B, 2, D]: pooled text tags [B, L] and pooled
    reference frames [B, R, K], each projected, or its learned null where
    not used (use_* & *_valid False, all [B] bool)."""
    text_ids, ref_codes = text_ids.long(), ref_codes.long()
    tpool = _mean_valid(_lookup(self.text_embed.weight, text_ids), text_ids >= 0)
    remb = self.track_embedding(self.accomp_embed, ref_codes)
    rpool = _mean_valid(remb, ref_codes[..., 0] >= 0)
    null = self.null_prefix
    text = torch.where((use_text.bool() & text_valid.bool())[:, None],
                       self.text_proj(tpool), null[0])
    ref = torch.where((use_ref.bool() & ref_valid.bool())[:, None],
                      self.ref_proj(rpool), null[1])
    return torch.stack([text, ref], dim=1)

  def null(self, batch: int) -> torch.Tensor:
    """The learned null prefix [B, 2, D] (no text, no reference)."""
    return self.null_prefix[None].expand(batch, -1, -1)

  # -------------------------------------------------------------- backbone
  def hidden(self, vocal: torch.Tensor, accomp: torch.Tensor,
             valid: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Backbone output over the T frames [B, T, D] (prefix positions dropped)
    for vocal and accompaniment codes [B, T, K] and frame validity [B, T]."""
    valid = valid.bool()
    x = torch.cat([self.track_embedding(self.vocal_embed, vocal.long()),
                   self.track_embedding(self.accomp_embed, accomp.long())], -1)
    if self.conv_kernel:
      x = x + self.local_mix(x * valid[..., None].to(x.dtype))
    x = torch.cat([prefix.to(x.dtype), x], dim=1)
    b, n = x.shape[:2]
    p = prefix.shape[1]
    full_valid = torch.cat(
        [torch.ones(b, p, dtype=torch.bool, device=x.device), valid], 1)
    positions = torch.arange(n, device=x.device).expand(b, n)
    h = self.backbone(x, positions,
                      transformer.causal_mask(full_valid, causal=self.causal))
    return h[:, p:]

  def local_mix(self, x: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution over frames of x [B, T, D]: zero 'same' padding,
    or causal (only past and current frames) for the 'ar' model."""
    k = self.conv_kernel
    pads = (k - 1, 0) if self.causal else (k // 2, k // 2)
    y = F.conv1d(F.pad(x.transpose(1, 2), pads), self.conv.weight,
                 groups=x.shape[-1])
    return y.transpose(1, 2)

  # ----------------------------------------------------------------- heads
  def logits(self, h: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> accompaniment logits [B, T, K, V] (float32)."""
    return torch.stack([head(h) for head in self.heads], dim=2).float()

  def rtd_logits(self, h: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> replaced-token-detection logits [B, T, K] (float32)."""
    return self.rtd_head(h).float()

  # -------------------------------------------------------------- sampling
  def condition(self, vocal: torch.Tensor, text_ids=None, ref_codes=None,
                ref_valid=None) -> torch.Tensor:
    """The prefix of a request as the JAX task builds it: text used where any
    id is given, the reference where ref_valid; absent inputs are nulls."""
    b, dev = vocal.shape[0], vocal.device
    if text_ids is None:
      text_ids = torch.full((b, 1), EMPTY, dtype=torch.long, device=dev)
    if ref_codes is None:
      ref_codes = torch.full((b, 1, self.num_codebooks), EMPTY, dtype=torch.long,
                             device=dev)
      ref_valid = torch.zeros(b, dtype=torch.bool, device=dev)
    if ref_valid is None:
      ref_valid = (ref_codes[..., 0] >= 0).any(1)
    yes = torch.ones(b, dtype=torch.bool, device=dev)
    return self.prefix(text_ids, (text_ids >= 0).any(1), ref_codes, ref_valid,
                       yes, yes)

  @torch.no_grad()
  def accompany(self, vocal: torch.Tensor, valid: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None,
                ref_codes: torch.Tensor | None = None,
                ref_valid: torch.Tensor | None = None, steps: int = DEFAULT_STEPS,
                temperature: float = 1.0, top_k: int = DEFAULT_TOP_K,
                top_p: float = DEFAULT_TOP_P,
                mask_temperature: float = DEFAULT_MASK_TEMPERATURE,
                cfg_scale: float = 1.0, known: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                noise: 'Noise | None' = None,
                prefix: torch.Tensor | None = None,
                temperature_after_filter: bool = True) -> torch.Tensor:
    """Accompaniment codes [B, T, K] for vocal codes [B, T, K].

    valid [B, T] (default all): invalid frames stay PAD. text_ids [B, L] and
    ref_codes [B, R, K] (-1 = absent) with ref_valid [B] condition through
    the prefix (`condition`; or pass `prefix` [B, 2, D] itself); cfg_scale
    != 1 guides against the learned nulls (u + s * (c - u)). known [B, T, K]:
    tokens already decided (>= 0) start committed. An 'ar' model decodes
    frame by frame (`accompany_ar`; steps, mask_temperature and known do not
    apply).

    Randomness: `noise` (a `Noise`; default Gumbel noise from `generator`).
    temperature 0 takes the argmax token (its confidence is its probability
    under the filtered logits at temperature 1; JAX requires temperature >
    0) and mask_temperature 0 remasks by confidence alone: with both, no
    noise is drawn and the result is deterministic.
    temperature_after_filter (config.sample.temperature_after_filter): True
    cuts top-p / top-k on the raw logits and divides the kept ones by the
    temperature (the released LaDA-Band order), False divides first.
    """
    valid = _default_valid(vocal, valid)
    if prefix is None:
      prefix = self.condition(vocal, text_ids, ref_codes, ref_valid)
    settings = Sampling(temperature, top_k, top_p, cfg_scale,
                        temperature_after_filter)
    noise = noise if noise is not None else GumbelNoise(generator)
    was_training = self.training
    self.eval()
    try:
      if self.causal:
        if known is not None:
          raise ValueError("known tokens need the diffusion model; this is the "
                           "'ar' ablation")
        return decode_ar(self, vocal, valid, prefix, settings, noise)
      return decode_diffusion(self, vocal, valid, prefix, settings, noise, steps,
                              mask_temperature, known)
    finally:
      self.train(was_training)

  @torch.no_grad()
  def accompany_ar(self, vocal, valid=None, text_ids=None, ref_codes=None,
                   ref_valid=None, temperature: float = 1.0,
                   top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                   cfg_scale: float = 1.0, generator=None, noise=None,
                   prefix=None, temperature_after_filter: bool = True
                   ) -> torch.Tensor:
    """The 'ar' ablation's decoding (as JAX `accompany_ar`): frame by frame,
    each step running the causal model over the whole window."""
    if not self.causal:
      raise ValueError("accompany_ar needs a model with decode='ar'")
    return self.accompany(vocal, valid, text_ids, ref_codes, ref_valid,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          cfg_scale=cfg_scale, generator=generator, noise=noise,
                          prefix=prefix,
                          temperature_after_filter=temperature_after_filter)


def _default_valid(vocal: torch.Tensor, valid: torch.Tensor | None
                   ) -> torch.Tensor:
  if valid is None:
    return torch.ones(vocal.shape[:2], dtype=torch.bool, device=vocal.device)
  return valid.bool()


# --------------------------------------------------------------------- noise
class Noise(Protocol):
  """Where a sampler's randomness comes from: standard Gumbel noise, float32.
  `tokens(step, shape)` for the token draw of a step ([B, T, K, V] diffusion,
  [B, K, V] for frame `step` of the 'ar' decode); `mask(step, shape)` [B, N]
  for the remasking scores of a diffusion step."""

  def tokens(self, step: int, shape: Sequence[int]) -> torch.Tensor: ...

  def mask(self, step: int, shape: Sequence[int]) -> torch.Tensor: ...


class GumbelNoise:
  """Gumbel noise -log(-log(u)), u uniform in [tiny, 1), from a generator."""

  def __init__(self, generator: torch.Generator | None = None,
               device: torch.device | str | None = None):
    self.generator = generator
    self.device = device if device is not None else (
        generator.device if generator is not None else 'cpu')

  def _draw(self, shape: Sequence[int]) -> torch.Tensor:
    u = torch.rand(tuple(shape), generator=self.generator, device=self.device)
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))

  def tokens(self, step: int, shape: Sequence[int]) -> torch.Tensor:
    return self._draw(shape)

  def mask(self, step: int, shape: Sequence[int]) -> torch.Tensor:
    return self._draw(shape)


# ------------------------------------------------------------ sampler maths
class Sampling:
  """Guidance and token settings shared by both decoders."""

  def __init__(self, temperature: float, top_k: int, top_p: float,
               cfg_scale: float, temperature_after_filter: bool = True):
    if temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {temperature}')
    if not isinstance(top_k, int) or top_k < 0:
      raise ValueError(f'top_k must be an int >= 0, got {top_k!r}')
    if not 0 < top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {top_p}')
    self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
    self.cfg_scale = cfg_scale
    self.temperature_after_filter = temperature_after_filter

  @property
  def cfg(self) -> bool:
    return self.cfg_scale != 1.0


def _threshold_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
  """The k-th largest logit per row [..., 1] (ties counted)."""
  return torch.topk(logits, k, dim=-1).values[..., -1:]


def _threshold_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
  """The largest logit v whose at-or-above probability mass reaches p, per
  row [..., 1] (JAX's bisection finds the same element; ties counted)."""
  probs = torch.softmax(logits.float(), dim=-1)
  vals, order = torch.sort(logits, dim=-1, descending=True)
  cum = torch.cumsum(torch.gather(probs, -1, order), dim=-1)
  # The first index whose cumulative mass reaches p lies in the tie group
  # whose at-or-above mass first reaches p, so its value is the threshold
  # with ties counted.
  first = torch.sum(cum < p, dim=-1, keepdim=True)
  # Rounding can leave the whole mass below p: then every finite logit stays.
  finite = torch.sum(torch.isfinite(vals), dim=-1, keepdim=True)
  return torch.gather(vals, -1, torch.minimum(first, finite - 1))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0
                  ) -> torch.Tensor:
  """Top-p then top-k (the released code's order), -inf elsewhere, as JAX
  `diffusion.filter_logits`: both keep a prefix of the descending order, so
  the cut is the larger threshold; ties with the last kept token stay."""
  vocab = logits.shape[-1]
  k_on = 0 < top_k < vocab
  if not k_on and top_p == 1.0:
    return logits
  cut = torch.full(logits.shape[:-1] + (1,), -math.inf, dtype=logits.dtype,
                   device=logits.device)
  if k_on:
    cut = torch.maximum(cut, _threshold_top_k(logits, top_k))
  if top_p < 1.0:
    cut = torch.maximum(cut, _threshold_top_p(logits, top_p).to(cut.dtype))
  return torch.where(logits >= cut, logits, torch.full_like(logits, -math.inf))


def schedule_ratios(steps: int) -> list[float]:
  """Masked fraction after each step (JAX `diffusion.schedule_ratios`):
  cos(progress * pi / 2), progress = (i + 1) / steps, Python floats (float64)
  in this order, clipped to [0, 1], as LaDA-Band's released sampler."""
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}')
  return [min(1.0, max(0.0, math.cos((i + 1) / steps * math.pi / 2.0)))
          for i in range(steps)]


def num_masked_after(step: int, steps: int, total: torch.Tensor,
                     n_masked: torch.Tensor) -> torch.Tensor:
  """Tokens left masked after step `step` of `steps` [B] (JAX
  `diffusion.num_masked_after`): the float64 product ratio * total made
  float32, then floored (as the released sampler's torch.tensor of a Python
  float), clipped to [1, n_masked - 1] before the last step, 0 at the last."""
  ratio = schedule_ratios(steps)[step]
  product = ratio * total.to(torch.float64)       # one float64 rounding
  n = torch.floor(product.to(torch.float32)).long()
  n = torch.clamp(torch.minimum(n_masked - 1, n), min=1)
  if step >= steps - 1:
    n = torch.zeros_like(n)
  return torch.minimum(torch.clamp(n, min=0), n_masked)


def gumbel_scale(step: int, steps: int, mask_temperature: float) -> torch.Tensor:
  """mask_temperature * (1 - (step + 1) / steps) in float32, rounded as XLA
  compiles it: the division becomes a product with 1/steps, and
  1 - (step + 1) * (1/steps) one fused multiply-add (a single rounding, done
  here in float64: the product is exact there)."""
  if mask_temperature < 0:
    raise ValueError(f'mask_temperature must be >= 0, got {mask_temperature}')
  f32 = torch.float32
  per_step = torch.tensor(1.0, dtype=f32) / torch.tensor(steps, dtype=f32)
  left = (1.0 - (step + 1) * per_step.double()).float()
  return torch.tensor(mask_temperature, dtype=f32) * left


def remask(confidence: torch.Tensor, still_masked: torch.Tensor,
           n_keep_masked: torch.Tensor, scale: torch.Tensor,
           noise: torch.Tensor | None) -> torch.Tensor:
  """The n lowest-scoring still-masked positions of each row [B, N] (JAX
  `diffusion.remask`): score = log(confidence) + scale * noise, +inf where
  committed; a stable ranking keeps exactly n masked even when scores tie."""
  score = torch.log(confidence.float())
  if noise is not None:
    score = score + scale * noise
  score = torch.where(still_masked, score, torch.full_like(score, math.inf))
  order = torch.argsort(score, dim=-1, stable=True)
  rank = torch.argsort(order, dim=-1)
  n = torch.minimum(n_keep_masked, still_masked.sum(-1))
  return (rank < n[:, None]) & still_masked


def draw(logits: torch.Tensor, s: Sampling, noise: Noise | None, step: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
  """(tokens, filtered logits) from guided logits [..., V]: top-p then
  top-k and the temperature, in the order s.temperature_after_filter names
  (JAX `sample.token_logits`), then the Gumbel-max draw (argmax at
  temperature 0)."""
  if s.temperature == 0:
    lg = filter_logits(logits, s.top_k, s.top_p)
    return torch.argmax(lg, dim=-1), lg
  if s.temperature_after_filter:
    lg = filter_logits(logits, s.top_k, s.top_p) / s.temperature
  else:
    lg = filter_logits(logits / s.temperature, s.top_k, s.top_p)
  g = noise.tokens(step, lg.shape).to(lg.device)
  return torch.argmax(lg + g, dim=-1), lg


def guided_logits(model: AccompModel, vocal, accomp, valid, prefix,
                  s: Sampling) -> torch.Tensor:
  """Logits [B, T, K, V], guided against the learned nulls when s.cfg (the
  batch doubled: conditional rows, then null rows)."""
  if not s.cfg:
    return model.logits(model.hidden(vocal, accomp, valid, prefix))
  b = vocal.shape[0]
  both = model.logits(model.hidden(
      torch.cat([vocal, vocal]), torch.cat([accomp, accomp]),
      torch.cat([valid, valid]), torch.cat([prefix, model.null(b).to(prefix)])))
  cond, uncond = both[:b], both[b:]
  return uncond + s.cfg_scale * (cond - uncond)


# ------------------------------------------------------------------ decoders
def decode_diffusion(model: AccompModel, vocal, valid, prefix, s: Sampling,
                     noise: Noise, steps: int, mask_temperature: float,
                     known: torch.Tensor | None) -> torch.Tensor:
  """JAX `sample.accompany`: from all-MASK to all-committed in `steps`
  steps; each samples every masked token and keeps the most confident
  (confidence plus annealed Gumbel noise), the rest re-masked."""
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}')
  vocal = vocal.long()
  b, t, k = vocal.shape
  mask_tok, pad_tok = model.mask_id, model.pad_id
  token_valid = valid[..., None].expand(b, t, k)
  x = torch.where(token_valid, mask_tok, pad_tok)
  if known is not None:
    known = known.long().to(x.device)
    x = torch.where(token_valid & (known >= 0), known, x)
  total = (x == mask_tok).reshape(b, -1).sum(1)
  for i in range(steps):
    masked = x == mask_tok
    sampled, lg = draw(guided_logits(model, vocal, x, valid, prefix, s), s,
                       noise, i)
    conf = torch.gather(torch.softmax(lg, -1), -1, sampled[..., None])[..., 0]
    tokens = torch.where(masked, sampled, x)
    n_masked = masked.reshape(b, -1).sum(1)
    keep = num_masked_after(i, steps, total, n_masked)
    scale = gumbel_scale(i, steps, mask_temperature).to(x.device)
    # Zero scale adds nothing (the noise is finite), so none is drawn.
    g = noise.mask(i, (b, t * k)).to(x.device) if float(scale) > 0 else None
    new_mask = remask(torch.clamp(conf, min=MIN_CONFIDENCE).reshape(b, -1),
                      masked.reshape(b, -1), keep, scale, g)
    x = torch.where(new_mask.reshape(b, t, k), mask_tok, tokens)
  return x


def decode_ar(model: AccompModel, vocal, valid, prefix, s: Sampling,
              noise: Noise) -> torch.Tensor:
  """JAX `sample.accompany_ar`: frame i's K codes from the causal model's
  logits at frame i, whose accompaniment input is shifted one frame right
  (MASK as the first frame's input); no key/value cache, as JAX."""
  vocal = vocal.long()
  b, t, k = vocal.shape
  bos, pad_tok = model.mask_id, model.pad_id
  x = torch.full((b, t, k), pad_tok, dtype=torch.long, device=vocal.device)
  for i in range(t):
    inp = torch.cat([torch.full_like(x[:, :1], bos), x[:, :-1]], dim=1)
    lg = guided_logits(model, vocal, inp, valid, prefix, s)[:, i]
    x[:, i] = draw(lg, s, noise, i)[0]
  return torch.where(valid[..., None], x, torch.full_like(x, pad_tok))
