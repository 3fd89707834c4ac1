"""HeartCodec as a trainer task: the waveform autoencoder, the code encoder and
the flow-matching decoder trained together (trainable.py).

One step, one optimizer, three losses (weights in config.loss):
  * reconstruction: multi-scale mel (+ optional STFT / L1) of
    ScalarDecoder(round(encoder(x))) against x (musicjax/codec/losses.py);
  * flow matching on the rounded latent x1 (no gradient into the encoder),
    rectified flow as the sampler assumes: x_t = (1 - (1 - sigma_min) t) x0
    + t x1, target velocity x1 - (1 - sigma_min) x0, t ~ U(0, 1). With
    probability prefix_prob an item's first frames are known, as in a window
    after the first (flow_matching.py): they sit on the path, are given as
    the in-context latent, and carry no loss. With probability uncond_prob an
    item's code features are zeroed, the unconditional half of
    classifier-free guidance;
  * VQ: commitment + codebook loss of the residual VQ.
No adversarial loss yet: the waveform decoder trains on spectral losses only.

Eval: flow loss, the autoencoder's mel distance and `mel_distance`, the full
decode path: encode -> codes -> Euler sampler (config.model.flow steps and
guidance, one window of the segment, no prefix) -> waveform.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicjax.codec import losses
from musicjax.codec import task as codec_task
from musicjax.codec.heartcodec import config as hc_config
from musicjax.codec.heartcodec.trainable import TrainableHeartCodec
from musicjax.config import ConfigError
from musicjax.eval import audio_metrics
from musicjax.parallel import rules
from musicjax.train.task import ArraySpec, Task

ConfigDict = ml_collections.ConfigDict


def default_config() -> ConfigDict:
  """config.model is HeartCodec's decoder config (heartcodec/config.py, the
  released numbers) plus the encoder sides; data / loss keep the codec's keys."""
  c = ConfigDict()
  m = c.model = hc_config.default_config()
  e = m.encoder = ConfigDict()     # waveform encoder (mirrors config.model.scalar)
  e.init_channel = 64              # channels after the stem; doubles per block
  e.res_dilations = (1, 3, 5, 7, 9)
  e.res_kernel_size = 7
  e.kernel_size = 7                # stem conv
  e.out_kernel_size = 3            # centred conv to the latent
  e.init_std = 0.02
  q = m.quantizer = ConfigDict()   # 25 Hz latent -> residual VQ (codes.*)
  q.hidden_dim = 512
  q.kernel_multiple = 2            # downsampling kernel = multiple x frames_per_code
  q.init_std = 0.02
  q.kmeans_init = True             # codebooks from k-means of the first batch
  q.kmeans_iters = 10
  q.ema_decay = 0.99               # of the usage counts behind dead-code restarts
  q.dead_code_threshold = 0.05     # mean uses per batch below which a code restarts
  q.quantizer_dropout = 0.0        # the LM always reads all K codebooks

  c.data = codec_task.default_config().data
  c.data.sample_rate = 48000
  c.data.channels = 2

  o = c.optim = ConfigDict()
  o.lr = 1e-4
  o.b1 = 0.9
  o.b2 = 0.99
  o.weight_decay = 0.01
  o.clip = 1.0
  o.lr_decay = 1.0                 # per-step exponential decay
  o.warmup_steps = 1000

  lo = c.loss = ConfigDict()
  for key in ('mel_windows', 'mel_bins', 'mel_fmin', 'mel_fmax', 'mel_power',
              'mel_log_weight', 'mel_mag_weight', 'stft_windows', 'stft_power',
              'stft_log_weight', 'stft_mag_weight', 'hop_fraction', 'clamp',
              'mel_weight', 'stft_weight', 'wave_weight', 'commit_weight',
              'codebook_weight'):
    lo[key] = codec_task.default_config().loss[key]
  lo.flow_weight = 1.0
  lo.prefix_prob = 0.5             # share of items with a known prefix
  lo.max_prefix_fraction = 0.5     # prefix up to this share of the frames
  lo.uncond_prob = 0.1             # share of items without code features (CFG)
  return c


class StepCounter(nnx.Variable):
  """Number of completed train steps (not touched by the optimizer)."""


class HeartCodecState(nnx.Module):

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    o = config.optim
    self.model = TrainableHeartCodec(config.model, rngs=rngs)
    self.opt = nnx.Optimizer(self.model, codec_task.make_optimizer(o.lr, o.clip, o),
                             wrt=nnx.Param)
    self.step = StepCounter(jnp.zeros((), jnp.int32))


class HeartCodecTask(Task):
  name = 'heartcodec'
  progress_metrics = ('loss/total', 'loss/mel', 'loss/flow')
  # Warm start (musicjax/train/warm_start.py): init and the quantizer's
  # training-time behaviour, not its weights, may differ.
  free_model_keys = ('encoder.init_std', 'quantizer.init_std',
                     'quantizer.kmeans_init', 'quantizer.kmeans_iters',
                     'quantizer.ema_decay', 'quantizer.dead_code_threshold',
                     'quantizer.quantizer_dropout')

  def __init__(self, config: ConfigDict):
    super().__init__(config)
    check_config(config)

  @classmethod
  def default_config(cls) -> ConfigDict:
    return default_config()

  def create_state(self, rngs: nnx.Rngs) -> HeartCodecState:
    return HeartCodecState(self.config, rngs)

  def inference_model(self, state: HeartCodecState) -> TrainableHeartCodec:
    return state.model

  def segment_length(self) -> int:
    return int(round(self.config.data.segment_seconds * self.config.data.sample_rate))

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    return {'audio': ArraySpec((batch_size, self.segment_length(),
                                self.config.data.channels), np.float32,
                               ('batch', 'time', None))}

  # ---- losses ---------------------------------------------------------------
  def _flow_loss(self, model: TrainableHeartCodec, target: jax.Array,
                 features: jax.Array, rng: jax.Array) -> jax.Array:
    """Masked MSE of the estimator's velocity on one batch of latents."""
    lc, f = self.config.loss, self.config.model.flow
    b, t, _ = target.shape
    k_noise, k_t, k_use, k_len, k_cond = jax.random.split(rng, 5)
    x0 = jax.random.normal(k_noise, target.shape, target.dtype)
    tt = jax.random.uniform(k_t, (b,))
    keep = 1.0 - float(f.sigma_min)
    x_t = (1 - keep * tt)[:, None, None] * x0 + tt[:, None, None] * target
    velocity = target - keep * x0
    max_prefix = int(lc.max_prefix_fraction * t)
    prefix = jnp.where(jax.random.uniform(k_use, (b,)) < lc.prefix_prob,
                       jax.random.randint(k_len, (b,), 1, max(max_prefix, 1) + 1), 0)
    known = (jnp.arange(t)[None, :] < prefix[:, None])[..., None]  # [B, T, 1]
    context = jnp.where(known, target, 0.0)
    cond = jax.random.uniform(k_cond, (b,)) >= lc.uncond_prob
    features = features * cond[:, None, None].astype(features.dtype)
    v = model.decoder.estimator(jnp.concatenate([x_t, context, features], -1), tt)
    free = 1.0 - known.astype(v.dtype)
    err = jnp.sum(free * jnp.square(v - velocity))
    return err / jnp.maximum(jnp.sum(free) * v.shape[-1], 1.0)

  def _losses(self, model: TrainableHeartCodec, audio: jax.Array,
              rng: jax.Array, train: bool) -> tuple[jax.Array, dict[str, Any]]:
    lc = self.config.loss
    k_vq, k_flow = jax.random.split(rng)
    latent = model.latent(audio)
    recon = model.decoder.waveform(latent)
    parts = losses.reconstruction_losses(audio, recon, lc,
                                         self.config.data.sample_rate)
    code_vectors, codes, aux = model.quantize(latent, k_vq, train)
    flow = self._flow_loss(model, jax.lax.stop_gradient(latent),
                           model.features(code_vectors), k_flow)
    total = (lc.mel_weight * parts['mel'] + lc.stft_weight * parts['stft']
             + lc.wave_weight * parts['wave'] + lc.flow_weight * flow
             + lc.commit_weight * aux['commit']
             + lc.codebook_weight * aux['codebook'])
    return total, dict(parts, flow=flow, recon=recon, codes=codes, aux=aux)

  # ---- steps ----------------------------------------------------------------
  def train_step(self, state: HeartCodecState, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> dict[str, jax.Array]:
    m_def, params, rest = nnx.split(state.model, nnx.Param, ...)
    rest = rules.gather(rest)

    def loss_fn(p):
      # FSDP: sharded weights are gathered here; grads reduce-scatter back.
      model = nnx.merge(m_def, rules.gather(p), rest)
      return self._losses(model, batch['audio'], rng, train=True)

    (total, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    state.opt.update(state.model, grads)
    aux = out['aux']
    state.model.quantizer.apply_updates(aux['updates'])
    state.step[...] = state.step[...] + 1
    metrics = {
        'loss/total': total, 'loss/mel': out['mel'], 'loss/stft': out['stft'],
        'loss/wave': out['wave'], 'loss/flow': out['flow'],
        'loss/commit': aux['commit'], 'loss/codebook': aux['codebook'],
        'optim/grad_norm': optax.tree.norm(grads),
        'rvq/dead_codes': jnp.sum(aux['dead_codes']).astype(jnp.float32),
    }
    for k in range(aux['perplexity'].shape[0]):
      metrics[f'rvq/perplexity_{k}'] = aux['perplexity'][k]
    return metrics

  def decode_segment(self, model: TrainableHeartCodec, codes: jax.Array,
                     rng: jax.Array) -> jax.Array:
    """Audio of codes [B, F, K] as one window without a prefix (jittable)."""
    b, f, _ = codes.shape
    shape = (b, f * model.frames_per_code, model.decoder.latent_channels)
    noise = jax.random.normal(rng, shape, jnp.float32)
    latent = model.decoder.latent_window(codes, noise, jnp.zeros(shape),
                                         jnp.int32(0))
    return model.decoder.waveform(latent)

  def eval_step(self, state: HeartCodecState, batch: Mapping[str, jax.Array],
                rng: jax.Array) -> dict[str, jax.Array]:
    audio = batch['audio']
    sr = self.config.data.sample_rate
    m_def, m_state = nnx.split(state.model)
    model = nnx.merge(m_def, rules.gather(m_state))
    k_loss, k_decode = jax.random.split(rng)
    total, out = self._losses(model, audio, k_loss, train=False)
    decoded = self.decode_segment(model, out['codes'], k_decode)
    metrics = {
        'mel_distance': audio_metrics.mel_distance(audio, decoded, sr),
        'si_sdr': audio_metrics.si_sdr(audio, decoded),
        'recon/mel_distance': audio_metrics.mel_distance(audio, out['recon'], sr),
        'recon/si_sdr': audio_metrics.si_sdr(audio, out['recon']),
        'loss/total': total, 'loss/mel': out['mel'], 'loss/flow': out['flow'],
        'loss/commit': out['aux']['commit'],
    }
    q = self.config.model.codes
    ppl = audio_metrics.codebook_perplexity(out['codes'], int(q.codebook_size))
    for k in range(ppl.shape[0]):
      metrics[f'rvq/perplexity_{k}'] = ppl[k]
    return metrics

  # ---- host-side summaries --------------------------------------------------
  @functools.cached_property
  def _decode_both(self):
    def run(state, audio, rng):
      model = nnx.merge(*state)
      latent = model.latent(audio)
      _, codes, _ = model.quantize(latent, rng, train=False)
      return model.decoder.waveform(latent), self.decode_segment(model, codes, rng)
    return jax.jit(run)

  def summaries(self, state: HeartCodecState, batch: Mapping[str, np.ndarray],
                rng: jax.Array) -> dict[str, Any]:
    sr = self.config.data.sample_rate
    audio = jnp.asarray(batch['audio'])[:1]
    recon, decoded = self._decode_both(nnx.split(state.model), audio, rng)
    orig, rec, dec = (np.asarray(jax.device_get(a))[0, :, 0]
                      for a in (audio, recon, decoded))
    return {'audio/original': (orig, sr), 'audio/autoencoder': (rec, sr),
            'audio/decoded': (dec, sr),
            'image/spectrogram': codec_task.spectrogram_image(orig, dec, sr)}


def check_config(c: ConfigDict) -> None:
  """Raises ConfigError naming the key for an inconsistent training config."""
  m, d = c.model, c.data
  try:
    hc_config.check_config(m)
  except ConfigError as err:  # its keys are config.model's here
    raise ConfigError(str(err).replace('config.', 'config.model.')) from None
  if d.sample_rate != m.sample_rate:
    raise ConfigError(f'config.data.sample_rate={d.sample_rate} must equal '
                      f'config.model.sample_rate={m.sample_rate}')
  if d.channels != m.scalar.channels:
    raise ConfigError(f'config.data.channels={d.channels} must equal '
                      f'config.model.scalar.channels={m.scalar.channels}')
  spc = hc_config.samples_per_code(m)
  t = int(round(d.segment_seconds * d.sample_rate))
  if t <= 0 or t % spc:
    raise ConfigError(
        f'config.data.segment_seconds={d.segment_seconds} gives {t} samples at '
        f'{d.sample_rate} Hz, not a positive multiple of the {spc} samples of '
        'one code (1 / config.model.code_rate_hz)')
  lc = c.loss
  for key in ('prefix_prob', 'max_prefix_fraction', 'uncond_prob'):
    if not 0.0 <= lc[key] <= 1.0:
      raise ConfigError(f'config.loss.{key} must be in [0, 1], got {lc[key]}')
