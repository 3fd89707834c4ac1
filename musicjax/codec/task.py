"""The RVQ codec as a trainer task: a GAN with two optimizers in one state.

One train step = one generator forward (kept as a VJP), a discriminator
update on the stop-gradient reconstruction, then a generator update from the
reconstruction/adversarial/feature/VQ losses, then the quantizer's statistics
(EMA, k-means init, dead-code restarts). Before `loss.adv_start_step` the
discriminator and adversarial terms are off (a select inside the step; the GAN is compiled out when it can never start).
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
from musicjax.config import ConfigError
from musicjax.parallel import rules
from musicjax.codec.discriminators import Discriminator
from musicjax.codec.model import CodecModel
from musicjax.eval import audio_metrics
from musicjax.eval import plots
from musicjax.train.task import ArraySpec, Task

ConfigDict = ml_collections.ConfigDict


class StepCounter(nnx.Variable):
  """Number of completed train steps (not touched by the optimizers)."""


def default_config() -> ConfigDict:
  """Every codec number. Defaults are the 24 kHz / 6 kbps base setting."""
  c = ConfigDict()
  m = c.model = ConfigDict()
  m.encoder_dim = 16             # channels after the stem; doubles per block
  m.decoder_dim = 256            # channels after the decoder stem; halves per block
  m.latent_dim = 64
  m.strides = (2, 4, 5, 8)       # hop = product = 320 -> 75 Hz at 24 kHz
  m.dilations = (1, 3, 9)        # residual units per block
  m.residual_kernel = 7
  m.stem_kernel = 7
  m.latent_kernel = 3
  m.down_kernel_multiple = 2     # strided conv kernel = multiple * stride
  m.up_kernel_multiple = 2       # transposed conv kernel = multiple * stride
  m.padding = 'same'             # same (centred) | causal
  # Where 'same' puts the extra sample of an odd padding total (odd strides):
  # right | left (DAC's torch convs, padding=ceil(stride/2); released DACs).
  # 'seanet': EnCodec's convs (kernel - stride split odd-left, or all left when
  # causal, and each conv completing its last frame on the right).
  m.pad_extra = 'right'
  m.pad_mode = 'zeros'           # zeros | reflect: what padding fills (EnCodec: reflect)
  m.activation = 'snake'         # snake (DAC) | elu (SEANet / EnCodec)
  m.compress = 1                 # residual branch at channels // compress (EnCodec: 2)
  m.conv_shortcut = False        # residual skip through a 1x1 conv (EnCodec)
  m.lstm_layers = 0              # x + LSTM(x) after the encoder blocks and decoder stem (EnCodec: 2)
  # Transposed convs' weight-norm g per output channel (ours) or per input
  # channel (torch's weight_norm of ConvTranspose1d: EnCodec).
  m.up_weight_norm = 'out'
  m.output_tanh = True
  # Fixed DC blocker at the decoder output, in Hz (0 = off): no loss pins DC
  # down, and decoders trained without it put 0.01-0.04 offsets on mastered
  # music. 10 Hz is below the lowest musical fundamentals (B0 31 Hz loses
  # 0.4 dB, E1 41 Hz 0.25 dB, which training can compensate) and keeps the FIR
  # short: ln(1/tolerance) * sr / (2 pi f_c) taps, ~5300 at 24 kHz. Runs saved
  # before this key existed load with 0 (saved_config_defaults below).
  m.output_highpass_hz = 10.0
  # Its impulse response is cut where R^k < this; the cut tail is put back by
  # rescaling, so DC stays exactly zero and only the response near f_c moves.
  m.output_highpass_tolerance = 1e-6
  # EnCodec's optional input normalisation: each encoded window is divided by
  # its RMS (over normalize_rms_dbfs), and the scale is kept beside the codes
  # (`musicjax encode` writes it; decode multiplies it back). Off by default:
  # gain augmentation (data.gain_augment_dbfs) already trains across levels,
  # and token datasets for the LM keep no scale.
  m.normalize = False
  m.normalize_rms_dbfs = -20.0   # codes decoded without a scale play at this RMS
  m.normalize_eps = 1e-8         # keeps the scale of silence finite (as EnCodec)
  m.init_std = 0.02              # conv weight init std (DAC); 0 = fan-in scaled
  q = m.rvq = ConfigDict()
  q.num_codebooks = 8
  q.codebook_size = 1024
  q.codebook_dim = 8             # factorized low-dim codes (DAC)
  q.factorized = True            # False: Euclidean lookup in latent_dim
  q.codebook_type = 'learned'    # learned (codebook loss) | ema (EnCodec)
  q.ema_decay = 0.99
  q.ema_eps = 1e-5               # Laplace smoothing of EMA cluster sizes
  q.kmeans_init = True           # Lloyd k-means on the first training batch
  q.kmeans_iters = 10
  q.dead_code_threshold = 0.05   # EMA uses per batch below which a code restarts (0 = off)
  q.quantizer_dropout = 0.5      # share of items trained with n_q ~ U[1, K]
  q.norm_eps = 1e-12

  da = c.data = ConfigDict()
  # Gain augmentation of training segments (DAC trains over a wide loudness
  # range): each segment is scaled to a target RMS drawn uniformly from this
  # (low, high) dBFS range, so the codec sees quiet masters as well as loud
  # ones. () or None = off; eval segments are never scaled.
  da.gain_augment_dbfs = (-40.0, -10.0)
  # ...unless that would put the peak above this: the peak cap wins (the RMS
  # ends lower), so nothing clips (-1 dBFS as in augment.FREQUENCY_BALANCE).
  da.gain_augment_peak_dbfs = -1.0
  # Segments quieter than this keep their level: silence stays silence, and a
  # fade-out's noise floor is not raised into loud hiss (without a floor a
  # -110 dBFS tail would gain up to 100 dB).
  da.gain_augment_floor_dbfs = -60.0

  d = c.disc = ConfigDict()
  d.periods = (2, 3, 5, 7, 11)
  d.period_channels = (16, 32, 64, 128)
  d.period_kernel = 5
  d.period_stride = 3
  d.post_kernel = 3
  d.stft_fft_sizes = (2048, 1024, 512)
  d.stft_bands = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
  d.stft_hop_fraction = 0.25
  d.stft_channels = 16
  d.stft_layers = 5
  d.stft_kernel = (3, 9)
  d.stft_stride = (1, 2)
  d.leaky_slope = 0.1

  o = c.optim = ConfigDict()
  o.g_lr = 1e-4
  o.d_lr = 1e-4
  o.b1 = 0.8
  o.b2 = 0.99
  o.weight_decay = 0.01
  o.g_clip = 1e3
  o.d_clip = 10.0
  o.lr_decay = 0.999996          # per-step exponential decay (DAC)
  o.warmup_steps = 0

  lo = c.loss = ConfigDict()
  lo.mel_windows = (32, 64, 128, 256, 512, 1024, 2048)
  lo.mel_bins = (5, 10, 20, 40, 80, 160, 320)
  lo.mel_fmin = 0.0
  lo.mel_fmax = 0.0              # 0 = Nyquist
  lo.mel_power = 1.0
  lo.mel_log_weight = 1.0
  lo.mel_mag_weight = 0.0
  lo.stft_windows = (2048, 512)
  lo.stft_power = 2.0
  lo.stft_log_weight = 1.0
  lo.stft_mag_weight = 1.0
  lo.hop_fraction = 0.25
  lo.clamp = 1e-5
  lo.mel_weight = 15.0
  lo.stft_weight = 0.0
  lo.wave_weight = 0.0
  lo.adv_weight = 1.0
  lo.feat_weight = 2.0
  lo.commit_weight = 0.25
  lo.codebook_weight = 1.0
  lo.adv_type = 'lsgan'          # lsgan | hinge
  lo.adv_start_step = 0
  return c


def saved_config_defaults() -> dict[str, Any]:
  """Keys of default_config() newer than some saved runs, with the values that
  reproduce those runs (config.load_saved fills them in): no output high-pass
  (their decoders were trained without it) and no gain augmentation (a
  resumed run keeps its data stream)."""
  return {'model.output_highpass_hz': 0.0, 'data.gain_augment_dbfs': ()}


def make_optimizer(lr: float, clip: float, o: ConfigDict) -> optax.GradientTransformation:
  decay = optax.exponential_decay(lr, transition_steps=1, decay_rate=o.lr_decay)
  if o.warmup_steps > 0:
    warm = optax.linear_schedule(0.0, lr, o.warmup_steps)
    sched = optax.join_schedules([warm, decay], [o.warmup_steps])
  else:
    sched = decay
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(sched, b1=o.b1, b2=o.b2,
                                 weight_decay=o.weight_decay))


class CodecState(nnx.Module):
  """Generator, discriminator, their optimizers and the step counter."""

  def __init__(self, config: ConfigDict, rngs: nnx.Rngs):
    o = config.optim
    self.generator = CodecModel(config.model, config.data.sample_rate,
                                config.data.channels, rngs=rngs)
    self.discriminator = Discriminator(config.disc, rngs=rngs)
    self.g_opt = nnx.Optimizer(self.generator, make_optimizer(o.g_lr, o.g_clip, o),
                               wrt=nnx.Param)
    self.d_opt = nnx.Optimizer(self.discriminator,
                               make_optimizer(o.d_lr, o.d_clip, o), wrt=nnx.Param)
    self.step = StepCounter(jnp.zeros((), jnp.int32))


def _split_real_fake(outs, n: int):
  real = [(l[:n], [f[:n] for f in fs]) for l, fs in outs]
  fake = [(l[n:], [f[n:] for f in fs]) for l, fs in outs]
  return real, fake


class CodecTask(Task):
  name = 'codec'
  progress_metrics = ('loss/total', 'loss/mel', 'loss/adv_d')
  # Warm start (musicjax/train/warm_start.py): both networks; an imported
  # codec's discriminator is the fresh one its import wrote.
  warm_start_subtrees = ('generator', 'discriminator')
  arch_sections = ('model', 'disc')
  # Init and the quantizer's training-time behaviour, not its weights.
  free_model_keys = ('init_std', 'rvq.kmeans_init', 'rvq.kmeans_iters',
                     'rvq.ema_decay', 'rvq.dead_code_threshold',
                     'rvq.quantizer_dropout')

  @classmethod
  def default_config(cls) -> ConfigDict:
    return default_config()

  @classmethod
  def saved_config_defaults(cls) -> dict[str, Any]:
    return saved_config_defaults()

  def create_state(self, rngs: nnx.Rngs) -> CodecState:
    return CodecState(self.config, rngs)

  def inference_model(self, state: CodecState) -> CodecModel:
    return state.generator

  @property
  def _adversarial(self) -> bool:
    """Whether the GAN terms are compiled in at all (a static config fact)."""
    lc = self.config.loss
    return (lc.adv_start_step < self.config.train.steps
            and (lc.adv_weight > 0 or lc.feat_weight > 0))

  # ---- shapes -------------------------------------------------------------
  @property
  def hop_length(self) -> int:
    return int(np.prod(self.config.model.strides))

  def segment_length(self) -> int:
    d = self.config.data
    t = int(round(d.segment_seconds * d.sample_rate))
    if t <= 0 or t % self.hop_length:
      raise ConfigError(
          f'config.data.segment_seconds={d.segment_seconds} gives {t} samples at '
          f'{d.sample_rate} Hz, not a positive multiple of the codec hop length '
          f'{self.hop_length} (product of config.model.strides)')
    return t

  def batch_spec(self, batch_size: int) -> Mapping[str, ArraySpec]:
    return {'audio': ArraySpec((batch_size, self.segment_length(),
                                self.config.data.channels), np.float32,
                               ('batch', 'time', None))}

  # ---- steps --------------------------------------------------------------
  def _recon_losses(self, audio, recon):
    return losses.reconstruction_losses(audio, recon, self.config.loss,
                                        self.config.data.sample_rate)

  def train_step(self, state: CodecState, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> dict[str, jax.Array]:
    lc = self.config.loss
    audio = batch['audio']
    n = audio.shape[0]
    adv_on = state.step[...] >= lc.adv_start_step

    # One generator forward, kept as a VJP for the generator update.
    g_def, g_params, g_rest = nnx.split(state.generator, nnx.Param, ...)
    g_rest = rules.gather(g_rest)

    def forward(params):
      # FSDP: sharded weights are gathered here; grads reduce-scatter back.
      params = rules.gather(params)
      recon, aux = nnx.merge(g_def, params, g_rest)(audio, rng, train=True)
      vq = lc.commit_weight * aux['commit'] + lc.codebook_weight * aux['codebook']
      return (recon, vq), aux

    (recon, vq_loss), vjp_fn, aux = jax.vjp(forward, g_params, has_aux=True)

    # Discriminator update on the stop-gradient reconstruction.
    fake = jax.lax.stop_gradient(recon)
    dpair_def, dpair = nnx.split((state.discriminator, state.d_opt))

    def d_update(st):
      disc, opt = nnx.merge(dpair_def, st)
      d_def, d_params, d_rest = nnx.split(disc, nnx.Param, ...)

      def d_loss(p):
        outs = nnx.merge(d_def, rules.gather(p), rules.gather(d_rest))(
            jnp.concatenate([audio, fake]))
        real, fk = _split_real_fake(outs, n)
        return losses.discriminator_loss(real, fk, lc.adv_type)

      loss, grads = jax.value_and_grad(d_loss)(d_params)
      opt.update(disc, grads)
      return nnx.state((disc, opt)), loss

    if self._adversarial:
      new_dpair, adv_d = d_update(dpair)
      # Warm-up: before adv_start_step the discriminator keeps its old state.
      # A select, not lax.cond: XLA:CPU ran the cond branches' convolutions
      # 2.5x slower (measured 1.2 vs 3.1 steps/s on configs/codec/tiny.py).
      dpair = jax.tree.map(lambda a, b: jnp.where(adv_on, a, b), new_dpair, dpair)
      adv_d = jnp.where(adv_on, adv_d, 0.0)
      nnx.update((state.discriminator, state.d_opt), dpair)
    else:
      adv_d = jnp.zeros((), jnp.float32)

    # Generator update: gradient of the losses w.r.t. the reconstruction,
    # pulled back through the single forward.
    d_def, d_state = nnx.split(state.discriminator)
    d_state = rules.gather(d_state)

    def g_loss(rec):
      parts = self._recon_losses(audio, rec)

      def adversarial(ds):
        outs = nnx.merge(d_def, ds)(jnp.concatenate([audio, rec]))
        real, fk = _split_real_fake(outs, n)
        return (losses.generator_adv_loss(fk, lc.adv_type),
                losses.feature_matching_loss(real, fk))

      zero = jnp.zeros((), jnp.float32)
      if self._adversarial:
        on = adv_on.astype(jnp.float32)
        adv_g, feat = adversarial(d_state)
        adv_g, feat = on * adv_g, on * feat
      else:
        adv_g, feat = zero, zero
      total = (lc.mel_weight * parts['mel'] + lc.stft_weight * parts['stft']
               + lc.wave_weight * parts['wave'] + lc.adv_weight * adv_g
               + lc.feat_weight * feat)
      parts.update(adv_g=adv_g, feat=feat)
      return total, parts

    (g_total, parts), d_recon = jax.value_and_grad(g_loss, has_aux=True)(recon)
    (grads,) = vjp_fn((d_recon, jnp.ones_like(vq_loss)))
    state.g_opt.update(state.generator, grads)
    state.generator.quantizer.apply_updates(aux['updates'])
    state.step[...] = state.step[...] + 1

    metrics = {
        'loss/total': g_total + vq_loss,
        'loss/mel': parts['mel'], 'loss/stft': parts['stft'],
        'loss/wave': parts['wave'], 'loss/adv_g': parts['adv_g'],
        'loss/adv_d': adv_d, 'loss/feat': parts['feat'],
        'loss/commit': aux['commit'], 'loss/codebook': aux['codebook'],
        'optim/g_grad_norm': optax.tree.norm(grads),
        'rvq/dead_codes': jnp.sum(aux['dead_codes']).astype(jnp.float32),
        'rvq/mean_n_q': jnp.mean(aux['n_q'].astype(jnp.float32)),
    }
    for k in range(aux['perplexity'].shape[0]):
      metrics[f'rvq/perplexity_{k}'] = aux['perplexity'][k]
    return metrics

  def eval_step(self, state: CodecState, batch: Mapping[str, jax.Array],
                rng: jax.Array) -> dict[str, jax.Array]:
    audio = batch['audio']
    g_def, g_state = nnx.split(state.generator)
    gen = nnx.merge(g_def, rules.gather(g_state))
    recon, aux = gen(audio, rng, train=False)
    sr = self.config.data.sample_rate
    parts = self._recon_losses(audio, recon)
    metrics = {
        'mel_distance': audio_metrics.mel_distance(audio, recon, sr),
        'stft_distance': audio_metrics.stft_distance(audio, recon),
        'si_sdr': audio_metrics.si_sdr(audio, recon),
        'bitrate': jnp.asarray(audio_metrics.bitrate(
            gen.num_codebooks, gen.codebook_size, gen.frame_rate), jnp.float32),
        'loss/mel': parts['mel'], 'loss/stft': parts['stft'],
        'loss/wave': parts['wave'], 'loss/commit': aux['commit'],
    }
    ppl = audio_metrics.codebook_perplexity(aux['codes'], gen.codebook_size)
    for k in range(ppl.shape[0]):
      metrics[f'rvq/perplexity_{k}'] = ppl[k]
    return metrics

  # ---- host-side summaries -----------------------------------------------
  @functools.cached_property
  def _reconstruct(self):
    def run(state, audio, rng):
      gen = nnx.merge(*state)
      return gen(audio, rng, train=False)[0]
    return jax.jit(run)

  def summaries(self, state: CodecState, batch: Mapping[str, np.ndarray],
                rng: jax.Array) -> dict[str, Any]:
    sr = self.config.data.sample_rate
    audio = jnp.asarray(batch['audio'])[:1]
    gdef, gstate = nnx.split(state.generator)
    recon = self._reconstruct((gdef, gstate), audio, rng)
    orig = np.asarray(jax.device_get(audio))[0, :, 0]
    rec = np.asarray(jax.device_get(recon))[0, :, 0]
    return {'audio/original': (orig, sr), 'audio/reconstruction': (rec, sr),
            'image/spectrogram': spectrogram_image(orig, rec, sr)}


def spectrogram_image(original: np.ndarray, reconstruction: np.ndarray,
                      sample_rate: int) -> np.ndarray:
  """HxWx3 uint8 picture of the two log-mel spectrograms, one above the other."""
  return plots.figure_rgb(plots.spectrogram_figure(
      {'original': original, 'reconstruction': reconstruction}, sample_rate,
      row_height=2.0, width=6.0, axes_labels=False))
