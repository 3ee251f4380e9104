"""Masked (absorbing-state) discrete diffusion: the process around a bidirectional backbone.

The backbone (any Linen module mapping tokens to logits, e.g. the library's transformer with
``causal=False``) is kept separate from the diffusion *process* defined here:

* masking schedules α(t) (linear, cosine, polynomial) with α'(t) and the ELBO weight;
* the forward process q(z_t | x): each scored token is kept with probability α(t), else
  replaced by ``mask_id``;
* the substitution parameterization applied to raw backbone logits (the mask logit is −∞ and
  visible tokens are copied through);
* the continuous-time ELBO (MD4 / MDLM) as a pure, unreduced loss on logits, and Monte Carlo
  estimators of ``log p(x)`` for SLiC / DPO on diffusion models: stratified ("antithetic")
  time sampling, exact-k masking weighted by L/k (LLaDA), and timesteps and masks shared
  between a policy and a reference (VRPO).

The ``mask_id``: a dedicated id, by default the last id of the backbone vocabulary
(``vocab_size - 1``): build the backbone with one more vocabulary slot than the tokenizer has so
that no text token collides with it. Ids 0-3 (pad, eos, bos, unk) are refused.

Conditioning is prefix style: positions outside ``target_mask_BxL`` (the prompt) are never
masked and never scored, so one code path serves unconditional and conditional models.
:func:`prefix_layout` builds ``inputs + [BOS] + targets`` sequences with their target mask.

The denoiser interface used throughout: ``denoise_fn(params, z_BxL, t_B) -> logits_BxLxV``
(raw logits, before :func:`substitution_logits`). The backbones here take no time input
(as in MDLM / LLaDA), which is what lets samplers reuse a denoiser output while z_t is unchanged.

Block diffusion and AR adaptation (:class:`DiffusionLM` ``block_length`` / ``shift`` /
``causal_prompt``): every position of a prefix-layout sequence gets a block id (prompt = block
0, canvas slot j in block 1 + j // block_length) and a query attends to keys of its own and
earlier blocks (:func:`block_ids`, :func:`block_causal_mask`). This one mask family spans the
causal LM (block length 1) and the bidirectional canvas (one block), which is why it serves
both adaptation from an autoregressive checkpoint (:func:`params_from_autoregressive`, with the
AR "shift": slot j read at position j - 1, and :func:`anneal_mask` ramping from causal to the
block mask) and exact KV caching of committed blocks during decoding (a block never sees later
ones). References: Arriola et al., "Block Diffusion" (BD3-LM, 2025); Gong et al., DiffuLLaMA
(2025); Nie et al., LLaDA (2025, semi-autoregressive blocks).

``−∞`` is represented by :data:`NEG_INF` (a finite −1e9: it underflows to probability 0 in
float32 softmax, and products with zero weights stay finite).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NEG_INF = -1e9
DenoiseFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MaskingSchedule:
  """α(t), the probability that a token is still unmasked at time t ∈ [0, 1].

  Attributes:
    kind: ``"linear"`` (α = 1 − t), ``"cosine"`` (α = 1 − cos(π/2 · (1 − t))) or
      ``"polynomial"`` (α = 1 − t^k).
    power: the exponent k of the polynomial schedule (ignored otherwise).
  """

  kind: str = "linear"
  power: float = 2.0

  def __post_init__(self):
    if self.kind not in ("linear", "cosine", "polynomial"):
      raise ValueError(
        f"unknown masking schedule {self.kind!r}; use 'linear', 'cosine' or 'polynomial'."
      )
    if self.kind == "polynomial" and not self.power > 0:
      raise ValueError(f"polynomial schedule needs power > 0, got {self.power}.")

  def alpha(self, t: jax.Array) -> jax.Array:
    """α(t): 1 at t = 0, 0 at t = 1."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "linear":
      return 1.0 - t
    if self.kind == "cosine":
      return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
    return 1.0 - t**self.power

  def dalpha(self, t: jax.Array) -> jax.Array:
    """α'(t) (≤ 0)."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "linear":
      return -jnp.ones_like(t)
    if self.kind == "cosine":
      return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
    return -self.power * t ** (self.power - 1.0)

  def weight(self, t: jax.Array) -> jax.Array:
    """ELBO weight −α'(t) / (1 − α(t)) in closed form (1/t for the linear schedule)."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "linear":
      return 1.0 / t
    if self.kind == "cosine":
      return 0.5 * math.pi * jnp.tan(0.5 * math.pi * (1.0 - t))
    return self.power / t

  def reveal_probability(self, t: jax.Array, s: jax.Array) -> jax.Array:
    """Probability that a token masked at t is unmasked at s < t: (α_s − α_t)/(1 − α_t)."""
    a_t, a_s = self.alpha(t), self.alpha(s)
    return jnp.clip((a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-12), 0.0, 1.0)


def as_schedule(schedule: MaskingSchedule | str) -> MaskingSchedule:
  """Accepts a :class:`MaskingSchedule` or a name: ``linear``, ``cosine``, ``polynomial[:k]``."""
  if isinstance(schedule, MaskingSchedule):
    return schedule
  if not isinstance(schedule, str):
    raise ValueError(f"schedule must be a MaskingSchedule or a name, got {schedule!r}.")
  kind, _, power = schedule.partition(":")
  try:
    return MaskingSchedule(kind, float(power)) if power else MaskingSchedule(kind)
  except ValueError as e:
    raise ValueError(
      f"bad schedule {schedule!r} ({e}); use e.g. 'cosine' or 'polynomial:2'."
    ) from None


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _check_tokens(name, x_BxL, target_mask_BxL=None):
  if x_BxL.ndim != 2:
    raise ValueError(f"{name}: tokens must be [B, L], got shape {x_BxL.shape}.")
  if target_mask_BxL is not None and target_mask_BxL.shape != x_BxL.shape:
    raise ValueError(
      f"{name}: target_mask shape {target_mask_BxL.shape} differs from tokens {x_BxL.shape}; "
      "pass one flag per token (1 = scored / generated, 0 = prompt or padding)."
    )


def _check_mask_id(name, mask_id, vocab_size=None):
  if not isinstance(mask_id, numbers.Integral) or mask_id < 0:
    raise ValueError(f"{name}: mask_id must be a non-negative int, got {mask_id!r}.")
  if vocab_size is not None and mask_id >= vocab_size:
    raise ValueError(
      f"{name}: mask_id={mask_id} is outside the vocabulary of size {vocab_size}; use "
      "vocab_size - 1 and build the backbone with one extra vocabulary slot."
    )


def _check_no_mask_in_data(name, x_BxL, target_mask_BxL, mask_id):
  """Checks concrete inputs only (traced values cannot be inspected)."""
  if isinstance(x_BxL, jax.core.Tracer) or isinstance(target_mask_BxL, jax.core.Tracer):
    return
  if np.any((np.asarray(x_BxL) == mask_id) & (np.asarray(target_mask_BxL) != 0)):
    raise ValueError(
      f"{name}: the data contain mask_id={mask_id} at scored positions; the mask id must be a "
      "dedicated id that the tokenizer never produces."
    )


# ---------------------------------------------------------------------------------------------
# forward process and parameterization
# ---------------------------------------------------------------------------------------------
def forward_mask(
  rng: jax.Array,
  x_BxL: jax.Array,
  t_B: jax.Array,
  *,
  schedule: MaskingSchedule | str,
  mask_id: int,
  target_mask_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Samples z_t ~ q(z_t | x): each target token is masked with probability 1 − α(t).

  Returns ``(z_BxL, masked_BxL)``; positions outside ``target_mask_BxL`` are never masked.
  """
  _check_tokens("forward_mask", x_BxL, target_mask_BxL)
  _check_mask_id("forward_mask", mask_id)
  if t_B.shape != x_BxL.shape[:1]:
    raise ValueError(f"forward_mask: t must be [B] = {x_BxL.shape[:1]}, got {t_B.shape}.")
  sched = as_schedule(schedule)
  p_mask_B = 1.0 - sched.alpha(t_B)
  masked = jax.random.uniform(rng, x_BxL.shape) < p_mask_B[:, None]
  if target_mask_BxL is not None:
    masked = masked & (target_mask_BxL != 0)
  return jnp.where(masked, mask_id, x_BxL), masked


def exact_k_mask(
  rng: jax.Array,
  x_BxL: jax.Array,
  target_mask_BxL: jax.Array,
  u_B: jax.Array,
  *,
  mask_id: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks exactly k of the n target tokens, k = ⌊u·n⌋ + 1 for u ∈ [0, 1) (LLaDA).

  With u uniform, k is uniform on {1..n} and the masked set uniform among k-subsets. Returns
  ``(z_BxL, masked_BxL, weight_B)`` with ``weight_B = n / k`` (0 for rows without targets).
  """
  _check_tokens("exact_k_mask", x_BxL, target_mask_BxL)
  target = target_mask_BxL != 0
  n_B = jnp.sum(target, axis=-1).astype(jnp.int32)
  k_B = jnp.clip(jnp.floor(u_B * n_B).astype(jnp.int32) + 1, 1, jnp.maximum(n_B, 1))
  keys = jnp.where(target, jax.random.uniform(rng, x_BxL.shape), 2.0)
  rank_BxL = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)
  masked = target & (rank_BxL < k_B[:, None])
  weight_B = jnp.where(n_B > 0, n_B / k_B, 0.0).astype(jnp.float32)
  return jnp.where(masked, mask_id, x_BxL), masked, weight_B


def substitution_logits(logits_BxLxV: jax.Array, z_BxL: jax.Array, *, mask_id: int) -> jax.Array:
  """The substitution parameterization (MDLM) applied to raw backbone logits.

  The mask token gets logit −∞ (the model never predicts [MASK]) and every visible position is
  a point mass on its own token (visible tokens are copied through). Idempotent.
  """
  if logits_BxLxV.shape[:-1] != z_BxL.shape:
    raise ValueError(
      f"substitution_logits: logits {logits_BxLxV.shape} do not match tokens {z_BxL.shape}; "
      "the denoiser must return [B, L, V] for tokens [B, L]."
    )
  v = logits_BxLxV.shape[-1]
  _check_mask_id("substitution_logits", mask_id, v)
  vocab = jnp.arange(v)
  logits = jnp.where(vocab == mask_id, NEG_INF, logits_BxLxV.astype(jnp.float32))
  copy = jnp.where(vocab[None, None, :] == z_BxL[:, :, None], 0.0, NEG_INF)
  return jnp.where((z_BxL == mask_id)[:, :, None], logits, copy)


def target_logprobs(
  logits_BxLxV: jax.Array, z_BxL: jax.Array, x_BxL: jax.Array, *, mask_id: int
) -> jax.Array:
  """``log p_θ(x_i | z_t)`` under the substitution parameterization: ``[B, L]``."""
  logp = jax.nn.log_softmax(substitution_logits(logits_BxLxV, z_BxL, mask_id=mask_id), axis=-1)
  return jnp.take_along_axis(logp, x_BxL[:, :, None].astype(jnp.int32), axis=-1)[..., 0]


def diffusion_loss(
  logits_BxLxV: jax.Array,
  x_BxL: jax.Array,
  z_BxL: jax.Array,
  t_B: jax.Array,
  *,
  schedule: MaskingSchedule | str,
  mask_id: int,
) -> jax.Array:
  """One-sample continuous-time negative ELBO of masked diffusion, per sequence: ``[B]``.

  .. math::

    -\\log p(x) \\le \\int_0^1 \\frac{-\\alpha'(t)}{1-\\alpha(t)}\\,
      \\mathbb{E}_{q(z_t|x)} \\Big[\\sum_{i:\\, z_t^i = m} -\\log p_\\theta(x^i \\mid z_t)\\Big] dt

  evaluated at one t per row (weight 1/t for the linear schedule). The masked set is read from
  ``z_BxL == mask_id``. Unreduced; average over the batch (or divide by token counts) at the
  call site.

  Args:
    logits_BxLxV: raw backbone logits on ``z_BxL``.
    x_BxL: clean tokens.
    z_BxL: the noised tokens (from :func:`forward_mask`).
    t_B: the diffusion time of each row, in (0, 1].
    schedule: the masking schedule.
    mask_id: the [MASK] id.

  References: Shi et al., "Simplified and Generalized Masked Diffusion for Discrete Data"
  (MD4, 2024); Sahoo et al., "Simple and Effective Masked Diffusion Language Models" (MDLM, 2024).
  """
  _check_tokens("diffusion_loss", x_BxL, z_BxL)
  if t_B.shape != x_BxL.shape[:1]:
    raise ValueError(f"diffusion_loss: t must be [B] = {x_BxL.shape[:1]}, got {t_B.shape}.")
  logp = target_logprobs(logits_BxLxV, z_BxL, x_BxL, mask_id=mask_id)
  masked_sum = jnp.sum(jnp.where(z_BxL == mask_id, logp, 0.0), axis=-1)
  return -as_schedule(schedule).weight(t_B) * masked_sum


# ---------------------------------------------------------------------------------------------
# Monte Carlo estimators of log p(x)
# ---------------------------------------------------------------------------------------------
def sample_times(
  rng: jax.Array, batch: int, num_samples: int, *, antithetic: bool = True, t_min: float = 1e-4
) -> jax.Array:
  """Diffusion times ``t_BxN`` in [t_min, 1] (N = Monte Carlo samples per row).

  With ``antithetic`` the N times of a row are stratified, ``(u + j/N) mod 1`` for one uniform
  u (MD4's low-discrepancy "antithetic" sampler); otherwise independent uniforms.
  """
  u = stratified_uniforms(rng, batch, num_samples, antithetic=antithetic)
  return t_min + (1.0 - t_min) * u


def stratified_uniforms(rng, batch: int, num_samples: int, *, antithetic: bool = True):
  """``[B, N]`` uniforms in [0, 1): stratified per row with ``antithetic``, else i.i.d."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  if not antithetic:
    return jax.random.uniform(rng, (batch, num_samples))
  offsets = jnp.arange(num_samples, dtype=jnp.float32) / num_samples
  return jnp.mod(jax.random.uniform(rng, (batch, 1)) + offsets[None, :], 1.0)


def _draws(
  rng, x_BxL, target_mask_BxL, num_samples, schedule, mask_id, antithetic, estimator, t_min
):
  """The N noised copies of x: ``z_NxBxL``, ``t_NxB`` and the per-sample weight ``w_NxB``."""
  k_u, k_m = jax.random.split(rng)
  u_BxN = stratified_uniforms(k_u, x_BxL.shape[0], num_samples, antithetic=antithetic)
  mask_keys = jax.random.split(k_m, num_samples)
  if estimator == "time":
    sched = as_schedule(schedule)
    t_NxB = (t_min + (1.0 - t_min) * u_BxN).T
    noise = lambda key, t: forward_mask(
      key, x_BxL, t, schedule=sched, mask_id=mask_id, target_mask_BxL=target_mask_BxL
    )[0]
    return jax.vmap(noise)(mask_keys, t_NxB), t_NxB, sched.weight(t_NxB)
  z_NxBxL, _, w_NxB = jax.vmap(
    lambda key, u: exact_k_mask(key, x_BxL, target_mask_BxL, u, mask_id=mask_id)
  )(mask_keys, u_BxN.T)
  n_B = jnp.maximum(jnp.sum(target_mask_BxL != 0, axis=-1), 1)
  t_NxB = jnp.sum(z_NxBxL == mask_id, axis=-1) / n_B[None, :]  # the masked fraction k/n
  return z_NxBxL, t_NxB.astype(jnp.float32), w_NxB


def _mc_elbo(name, denoise_fn, params_seq, x_BxL, target_mask_BxL, rng, num_samples, chunk, *args):
  """Mean over N draws of the ELBO estimate under each parameter set (same draws for all)."""
  _check_tokens(name, x_BxL, target_mask_BxL)
  _, mask_id, _, estimator, _ = args  # schedule, mask_id, antithetic, estimator, t_min
  _check_mask_id(name, mask_id)
  if estimator not in ("time", "exact_k"):
    raise ValueError(f"{name}: unknown ELBO estimator {estimator!r}; use 'time' or 'exact_k'.")
  for what, n in (("num_samples", num_samples), ("samples_per_call", chunk)):
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"{name}: {what} must be an int >= 1, got {n!r}.")
  _check_no_mask_in_data(name, x_BxL, target_mask_BxL, mask_id)
  z_NxBxL, t_NxB, w_NxB = _draws(rng, x_BxL, target_mask_BxL, num_samples, *args)

  def one(draw):
    z_BxL, t_B, w_B = draw
    out = []
    for params in params_seq:
      logp = target_logprobs(denoise_fn(params, z_BxL, t_B), z_BxL, x_BxL, mask_id=mask_id)
      out.append(w_B * jnp.sum(jnp.where(z_BxL == mask_id, logp, 0.0), axis=-1))
    return tuple(out)

  draws = (z_NxBxL, t_NxB, w_NxB)
  return [jnp.mean(e_NxB, axis=0) for e_NxB in jax.lax.map(one, draws, batch_size=chunk)]


def elbo_logprob(
  denoise_fn: DenoiseFn,
  params: Any,
  x_BxL: jax.Array,
  target_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  num_samples: int,
  schedule: MaskingSchedule | str = "linear",
  mask_id: int,
  antithetic: bool = True,
  estimator: str = "time",
  t_min: float = 1e-4,
  samples_per_call: int = 1,
) -> jax.Array:
  """Monte Carlo ELBO estimate of ``log p(x_target | x_prompt)``: ``[B]``.

  .. math::

    \\log p(x) \\ge \\mathbb{E}_{t, z_t}\\Big[ w \\sum_{i:\\, z_t^i = m}
      \\log p_\\theta(x^i \\mid z_t) \\Big]

  with ``estimator="time"``: t ~ U(t_min, 1) (stratified over the N samples with
  ``antithetic``), each target masked with prob. 1 − α(t), w = −α'(t)/(1 − α(t)); with
  ``estimator="exact_k"``: k ~ U{1..n} target tokens masked uniformly at random, w = n/k
  (n = number of target tokens; k stratified with ``antithetic``). Both are unbiased for the
  same bound, so the result is ≤ the true log-likelihood in expectation. Differentiable in
  ``params``. The N samples run sequentially (``lax.map``), ``samples_per_call`` of them per
  denoiser call (more is faster, uses more memory).

  Args:
    denoise_fn: ``(params, z_BxL, t_B) -> raw logits_BxLxV``.
    params: the denoiser's parameters.
    x_BxL: clean sequences (prompt + target).
    target_mask_BxL: 1 on scored positions; prompt/padding positions stay visible.
    rng: PRNG key (reuse it to get identical masks).
    num_samples: Monte Carlo samples per sequence.
    schedule: masking schedule (``estimator="time"`` only).
    mask_id: the [MASK] id.
    antithetic: stratify t (or k) over the samples of a row.
    estimator: ``"time"`` (MD4/MDLM) or ``"exact_k"`` (LLaDA).
    t_min: smallest sampled time (avoids the 1/t singularity; omits O(t_min) of the integral).
    samples_per_call: Monte Carlo samples batched into one denoiser call.

  References: Shi et al. 2024 (MD4); Sahoo et al. 2024 (MDLM); Nie et al., "Large Language
  Diffusion Models" (LLaDA, 2025).
  """
  args = (num_samples, samples_per_call, schedule, mask_id, antithetic, estimator, t_min)
  return _mc_elbo("elbo_logprob", denoise_fn, [params], x_BxL, target_mask_BxL, rng, *args)[0]


def paired_elbo_logprob(
  denoise_fn: DenoiseFn,
  params_policy: Any,
  params_ref: Any,
  x_BxL: jax.Array,
  target_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  num_samples: int,
  schedule: MaskingSchedule | str = "linear",
  mask_id: int,
  antithetic: bool = True,
  estimator: str = "time",
  t_min: float = 1e-4,
  samples_per_call: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """ELBO estimates under a policy and a reference with identical t and masks (VRPO).

  Same estimator as :func:`elbo_logprob` (and, for the same ``rng``, the same draws); sharing
  the noise makes the estimate of ``log π_θ(x) − log π_ref(x)`` far less variable than two
  independent estimates. Gradients are stopped on the reference output.

  Returns:
    ``(logp_policy_B, logp_ref_B)``.

  References: Zhu et al., "LLaDA 1.5: Variance-Reduced Preference Optimization for Large
  Language Diffusion Models" (2025).
  """
  args = (num_samples, samples_per_call, schedule, mask_id, antithetic, estimator, t_min)
  pol_B, ref_B = _mc_elbo(
    "paired_elbo_logprob",
    denoise_fn,
    [params_policy, params_ref],
    x_BxL,
    target_mask_BxL,
    rng,
    *args,
  )
  return pol_B, jax.lax.stop_gradient(ref_B)


# ---------------------------------------------------------------------------------------------
# layout and model wrapper
# ---------------------------------------------------------------------------------------------
def prefix_layout(
  inputs_BxS: jax.Array,
  targets_BxL: jax.Array | None = None,
  *,
  target_len: int | None = None,
  mask_id: int | None = None,
  score_padding: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """``inputs + [BOS] + targets`` per row (inputs right-padded with 0), left-aligned.

  Returns ``(tokens_BxT, target_mask_BxT)`` with T = S + 1 + L. The target region is the L
  slots after BOS; with ``score_padding`` all L slots are scored/generated (the model learns
  where EOS and padding go), otherwise only real target tokens (EOS included) - then the
  padding stays visible and the estimate conditions on the target length. Without
  ``targets_BxL`` the target region is filled with ``mask_id`` (a canvas for the samplers, whose
  ``fixed_mask_BxL`` is ``target_mask_BxT == 0``). Positions after the region are padding.
  """
  if inputs_BxS.ndim != 2:
    raise ValueError(f"prefix_layout: inputs must be [B, S], got {inputs_BxS.shape}.")
  b, s = inputs_BxS.shape
  if targets_BxL is None:
    if target_len is None or mask_id is None:
      raise ValueError("prefix_layout: without targets pass target_len and mask_id.")
    targets_BxL = jnp.full((b, target_len), mask_id, jnp.int32)
    real_BxL = jnp.ones((b, target_len), bool)
  else:
    if targets_BxL.ndim != 2 or targets_BxL.shape[0] != b:
      raise ValueError(f"prefix_layout: targets must be [B={b}, L], got {targets_BxL.shape}.")
    real_BxL = targets_BxL != PAD_ID
  length = targets_BxL.shape[1]
  s_B = jnp.sum(inputs_BxS != PAD_ID, axis=-1)
  j = jnp.arange(s + 1 + length)[None, :]
  t_idx = jnp.clip(j - s_B[:, None] - 1, 0, length - 1)
  from_inputs = jnp.take_along_axis(inputs_BxS, jnp.clip(j, 0, s - 1) + 0 * t_idx, axis=1)
  from_targets = jnp.take_along_axis(targets_BxL, t_idx, axis=1)
  in_region = (j > s_B[:, None]) & (j <= s_B[:, None] + length)
  tokens = jnp.where(
    j < s_B[:, None], from_inputs, jnp.where(j == s_B[:, None], BOS_ID, from_targets)
  )
  tokens = jnp.where((j <= s_B[:, None]) | in_region, tokens, PAD_ID).astype(jnp.int32)
  scored = in_region & (score_padding | jnp.take_along_axis(real_BxL, t_idx, axis=1))
  return tokens, scored.astype(jnp.int32)


def prompt_lengths(target_mask_BxL: jax.Array) -> jax.Array:
  """Prompt length s of each row of a :func:`prefix_layout` sequence: the first scored position
  is s + 1 (after the prompt and BOS). Rows without scored positions get L - 1."""
  scored = target_mask_BxL != 0
  first = jnp.where(jnp.any(scored, axis=1), jnp.argmax(scored, axis=1), target_mask_BxL.shape[1])
  return (first - 1).astype(jnp.int32)


def block_ids(
  prompt_len_B: jax.Array,
  length: int,
  *,
  block_length: int,
  shift: bool = False,
  causal_prompt: bool = False,
  canvas_len: int | None = None,
) -> jax.Array:
  """Block id of every position of a :func:`prefix_layout` sequence: ``[B, length]`` int32.

  A query attends to the keys whose block id is ≤ its own (:func:`block_causal_mask`). With
  ``n = s + 1`` (``shift=False``) or ``n = s`` (``shift=True``) for a prompt of s tokens,
  position n + i is the one whose output gives canvas slot i's logits; positions
  ``n .. n + canvas_len - 1`` get ``length + 1 + i // block_length`` (blocks of the canvas in
  order), positions before n (the prompt, and BOS without shift) get 0 (bidirectional prompt)
  or their own index (``causal_prompt``), positions after the canvas ``4 * length`` (seen by
  no canvas or prompt position). ``block_length = 1`` with ``shift`` and ``causal_prompt`` is
  exactly causal attention; one block of ``canvas_len`` is a bidirectional canvas.
  """
  if not isinstance(block_length, numbers.Integral) or block_length < 1:
    raise ValueError(f"block_ids: block_length must be an int >= 1, got {block_length!r}.")
  canvas_len = length if canvas_len is None else canvas_len
  n_B = prompt_len_B.astype(jnp.int32) + (0 if shift else 1)
  p = jnp.arange(length, dtype=jnp.int32)[None, :]
  rel = p - n_B[:, None]
  prompt = p if causal_prompt else jnp.zeros_like(p)
  ids = jnp.where(rel < 0, prompt, length + 1 + jnp.maximum(rel, 0) // block_length)
  return jnp.where(rel >= canvas_len, 4 * length, ids).astype(jnp.int32)


def block_causal_mask(ids_BxL: jax.Array) -> jax.Array:
  """``[B, L, L]`` boolean: query q sees key k iff ``ids[k] <= ids[q]``."""
  return ids_BxL[:, None, :] <= ids_BxL[:, :, None]


def anneal_mask(rng: jax.Array, final_BxLxL: jax.Array, p: jax.Array | float) -> jax.Array:
  """Attention-mask annealing from causal to ``final_BxLxL`` (DiffuLLaMA).

  Each (query, key) pair that ``final`` allows but the causal mask (k ≤ q) does not is allowed
  with probability p (drawn independently per row and pair); p = 0 gives ``final ∧ causal``,
  p = 1 gives ``final``. Ramp p linearly from 0 to 1 over the first adaptation steps.

  Reference: Gong et al., "Scaling Diffusion Language Models via Adaptation from
  Autoregressive Models" (DiffuLLaMA, 2025).
  """
  length = final_BxLxL.shape[-1]
  idx = jnp.arange(length)
  causal = idx[None, :] <= idx[:, None]
  open_ = jax.random.uniform(rng, final_BxLxL.shape) < p
  return final_BxLxL & (causal[None] | open_)


@dataclasses.dataclass(frozen=True)
class DiffusionLM:
  """A masked diffusion LM: any bidirectional backbone plus the process above.

  The backbone is called as ``backbone.apply({"params": p}, tokens_BxL, positions_BxL=...,
  segment_ids_BxL=..., deterministic=...)`` and returns logits ``[B, L, vocab_size]``; every
  position attends to every other (all segment ids 1, positions 0..L-1). The backbone takes no
  time input, so ``t`` is accepted and ignored.

  Attributes:
    backbone: a Linen module, e.g. ``TransformerLM`` with ``causal=False``.
    vocab_size: the backbone's output vocabulary (tokenizer vocabulary + 1 for [MASK]).
    mask_id: the [MASK] id; ``None`` means ``vocab_size - 1``.
    schedule: masking schedule used by :meth:`loss` and :meth:`logprob`.
    block_length: ``None``: every position attends to every other (the original model).
      An int: block-causal attention over a :func:`prefix_layout` sequence (:func:`block_ids`:
      the prompt is block 0, canvas slot j is in block 1 + j // block_length, a query sees its
      own and earlier blocks; the backbone must accept ``attention_mask_BxLxL``, as
      ``TransformerLM`` does). Committed blocks then never depend on later ones, so their keys
      and values can be cached exactly while later blocks are decoded
      (:func:`slicjax.decoding.diffusion_sampling.cached_block_sample`).
    shift: read slot j's logits from the backbone output at position j - 1, as an
      autoregressive LM predicts token j there (DiffuLLaMA / Dream); use it for a denoiser
      initialised from an AR checkpoint (:func:`params_from_autoregressive`). Position 0 must
      not be generated (the prefix layout puts BOS before the canvas).
    causal_prompt: with ``block_length``, the prompt attends causally (as in the AR model it
      came from) instead of bidirectionally.

  Block-causal attention is the one mechanism behind AR adaptation and cached block decoding:
  block length 1 with ``shift`` and ``causal_prompt`` is exactly the causal LM, one block over
  the canvas is a bidirectional canvas; the attention mask is annealed between them during
  adaptation (:func:`anneal_mask`).
  """

  backbone: nn.Module
  vocab_size: int
  mask_id: int | None = None
  schedule: MaskingSchedule | str = "linear"
  block_length: int | None = None
  shift: bool = False
  causal_prompt: bool = False

  def __post_init__(self):
    if self.mask_id is None:
      object.__setattr__(self, "mask_id", self.vocab_size - 1)
    _check_mask_id("DiffusionLM", self.mask_id, self.vocab_size)
    if self.mask_id in (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
      raise ValueError(
        f"DiffusionLM: mask_id={self.mask_id} collides with a special token (pad 0, eos 1, "
        "bos 2, unk 3); use a dedicated id such as vocab_size - 1."
      )
    object.__setattr__(self, "schedule", as_schedule(self.schedule))
    if self.block_length is not None and (
      not isinstance(self.block_length, numbers.Integral) or self.block_length < 1
    ):
      raise ValueError(
        f"DiffusionLM: block_length must be None (fully bidirectional) or an int >= 1, got "
        f"{self.block_length!r}."
      )

  def final_mask(self, target_mask_BxL, canvas_len=None) -> jax.Array | None:
    """The trained attention mask ``[B, L, L]`` for a prefix-layout batch (``None`` = every
    position sees every other)."""
    if self.block_length is None:
      return None
    ids = block_ids(
      prompt_lengths(target_mask_BxL), target_mask_BxL.shape[1], block_length=self.block_length,
      shift=self.shift, causal_prompt=self.causal_prompt, canvas_len=canvas_len,
    )
    return block_causal_mask(ids)

  def init(self, rng: jax.Array, length: int = 8, batch_size: int = 1):
    z = jnp.full((batch_size, length), self.mask_id, jnp.int32)
    return nn.unbox(self.backbone.init(rng, z))["params"]

  def raw_logits(
    self, params, z_BxL, *, deterministic: bool = True, rngs=None, attention_mask_BxLxL=None
  ) -> jax.Array:
    """Backbone logits ``[B, L, V]`` on z (before the substitution parameterization).

    ``attention_mask_BxLxL`` (from :meth:`final_mask` / :func:`anneal_mask`) is passed to the
    backbone when given; with ``shift`` slot j's logits are the backbone's at j - 1."""
    _check_tokens("DiffusionLM", z_BxL)
    b, length = z_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (b, length))
    extra = {} if attention_mask_BxLxL is None else {"attention_mask_BxLxL": attention_mask_BxLxL}
    logits = self.backbone.apply(
      {"params": params},
      z_BxL,
      positions_BxL=positions,
      segment_ids_BxL=jnp.ones((b, length), jnp.int32),
      deterministic=deterministic,
      rngs=rngs,
      **extra,
    )
    if self.shift:
      logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    if logits.shape != (b, length, self.vocab_size):
      raise ValueError(
        f"DiffusionLM: backbone returned {logits.shape}, expected {(b, length, self.vocab_size)};"
        " set vocab_size to the backbone's output vocabulary."
      )
    return logits

  def denoise_fn(self, params, z_BxL: jax.Array, t_B: jax.Array, mask_BxLxL=None) -> jax.Array:
    """The ``denoise_fn(params, z_BxL, t_B) -> logits_BxLxV`` contract (t is ignored)."""
    del t_B
    return self.raw_logits(params, z_BxL, attention_mask_BxLxL=mask_BxLxL)

  def _masked_denoise_fn(self, target_mask_BxL, canvas_len):
    mask = self.final_mask(target_mask_BxL, canvas_len)
    return lambda params, z_BxL, t_B: self.denoise_fn(params, z_BxL, t_B, mask)

  def denoiser(
    self, params, target_mask_BxL=None, canvas_len=None
  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``denoise(z_BxL, t_B) -> logits_BxLxV`` with params closed over, for the samplers.

    A block-causal model (``block_length``) needs the layout's ``target_mask_BxL`` (1 on the
    canvas) to place its blocks."""
    if self.block_length is not None and target_mask_BxL is None:
      raise ValueError(
        "DiffusionLM.denoiser: a block-causal model (block_length set) needs target_mask_BxL "
        "(the prefix layout's canvas flags) to place its blocks; pass it."
      )
    mask = None if target_mask_BxL is None else self.final_mask(target_mask_BxL, canvas_len)
    return lambda z_BxL, t_B: self.denoise_fn(params, z_BxL, t_B, mask)

  def loss(
    self, params, x_BxL, target_mask_BxL, rng, *, deterministic=True, dropout_rng=None,
    canvas_len=None, anneal_p=None,
  ):
    """Training loss: one-sample −ELBO per row, t stratified over the batch (MD4): ``[B]``.

    ``anneal_p`` (a scalar in [0, 1], or None): attention-mask annealing from causal to the
    final mask (:func:`anneal_mask`), for adapting an autoregressive checkpoint."""
    _check_tokens("DiffusionLM.loss", x_BxL, target_mask_BxL)
    k_t, k_m = jax.random.split(rng)
    k_a = jax.random.fold_in(rng, 1)
    t_B = sample_times(k_t, 1, x_BxL.shape[0])[0]
    opts = dict(schedule=self.schedule, mask_id=self.mask_id)
    z, _ = forward_mask(k_m, x_BxL, t_B, target_mask_BxL=target_mask_BxL, **opts)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    mask = self.final_mask(target_mask_BxL, canvas_len)
    if anneal_p is not None:
      if mask is None:
        b, length = x_BxL.shape
        mask = jnp.ones((b, length, length), bool)
      mask = anneal_mask(k_a, mask, anneal_p)
    logits = self.raw_logits(
      params, z, deterministic=deterministic, rngs=rngs, attention_mask_BxLxL=mask
    )
    return diffusion_loss(logits, x_BxL, z, t_B, **opts)

  def logprob(
    self, params, x_BxL, target_mask_BxL, rng, *, num_samples=8, canvas_len=None, **kw
  ) -> jax.Array:
    """:func:`elbo_logprob` with this model's denoiser, schedule and mask id."""
    kw = {"schedule": self.schedule, **kw, "num_samples": num_samples, "mask_id": self.mask_id}
    fn = self._masked_denoise_fn(target_mask_BxL, canvas_len)
    return elbo_logprob(fn, params, x_BxL, target_mask_BxL, rng, **kw)

  def paired_logprob(
    self, params_policy, params_ref, x_BxL, target_mask_BxL, rng, *, canvas_len=None, **kw
  ):
    """:func:`paired_elbo_logprob` with this model's denoiser, schedule and mask id."""
    kw = {"schedule": self.schedule, "num_samples": 8, **kw, "mask_id": self.mask_id}
    args = (params_policy, params_ref, x_BxL, target_mask_BxL, rng)
    fn = self._masked_denoise_fn(target_mask_BxL, canvas_len)
    return paired_elbo_logprob(fn, *args, **kw)


def params_from_autoregressive(ar_params, mask_row: str = "mean"):
  """Diffusion-LM parameters from an autoregressive ``TransformerLM`` checkpoint of the same
  architecture: the token embedding ``[V, D]`` gains the [MASK] row (id V, the diffusion
  model's ``mask_id``): the mean embedding (``mask_row="mean"``) or zeros (``"zeros"``); an
  untied output head ``[D, V]`` gains a zero column (the [MASK] logit is −∞ under the
  substitution parameterization, so its value never matters). Everything else is copied.
  Build the diffusion model with the AR model's config (``vocab_size`` = the tokenizer's, one
  id is added), ``shift=True`` and, to start from the AR model's exact function,
  ``causal_prompt=True`` (see :class:`DiffusionLM`)."""
  if mask_row not in ("mean", "zeros"):
    raise ValueError(f"mask_row must be 'mean' or 'zeros', got {mask_row!r}.")
  p = jax.tree.map(lambda x: x, dict(ar_params))
  if "token_embed" not in p or "embedding" not in p["token_embed"]:
    raise ValueError(
      "params_from_autoregressive: no token_embed/embedding in the parameters; pass the params "
      "of a decoder-only TransformerLM (unboxed, unscanned or scanned)."
    )
  emb_VxD = p["token_embed"]["embedding"]
  row = jnp.mean(emb_VxD, axis=0, keepdims=True) if mask_row == "mean" else jnp.zeros_like(
    emb_VxD[:1]
  )
  p["token_embed"] = {**p["token_embed"], "embedding": jnp.concatenate([emb_VxD, row], axis=0)}
  head = p.get("head", {}).get("lm_head")
  if head is not None:
    kernel_DxV = head["kernel"]
    new = jnp.concatenate([kernel_DxV, jnp.zeros_like(kernel_DxV[:, :1])], axis=1)
    p["head"] = {**p["head"], "lm_head": {**head, "kernel": new}}
  return p
