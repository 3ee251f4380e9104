"""Samplers for masked (absorbing) diffusion LMs.

Every sampler takes ``denoise(z_BxL, t_B) -> logits_BxLxV`` (parameters closed over; raw logits,
the substitution parameterization is applied here), a token array and a ``fixed_mask_BxL``
(1 = position must not change, e.g. the prompt; every other position starts as ``mask_id`` and
is filled), and a PRNG key. Each returns ``(tokens_BxL, DiffusionSampleStats)``. All loops are
``lax.while_loop`` with static shapes, so the samplers run under ``jax.jit`` (close over
``denoise`` and the keyword arguments, e.g. with ``functools.partial``).

* :func:`ancestral_sample` - the reverse process on a time grid (MD4 / MDLM).
* :func:`low_confidence_remasking_sample` - LLaDA: per step commit the k most confident masked
  positions of the current semi-autoregressive block.
* :func:`confidence_threshold_sample` - Fast-dLLM parallel decoding: commit every masked
  position of the current block with confidence ≥ τ, and at least the most confident one.
* :func:`confident_prefix_sample` - variable length (SDLM-style): in a window of
  ``block_length`` positions starting at the first masked one, commit the longest prefix whose
  confidences are all ≥ τ (at least one token).

* :func:`confidence_factor_sample` - Fast-dLLM's factor rule: commit the n most confident,
  n the largest with (n + 1)(1 − c_(n)) < f.
* :func:`cached_block_sample` - block diffusion with a KV cache for a block-causal
  :class:`~slicjax.models.diffusion.DiffusionLM`: blocks left to right, only the current block
  re-run per step against the cached prompt and committed blocks (any of the rules above).

Blocks are counted over the generated (non-fixed) positions of each row in order, so prompts of
different lengths share one static shape. Denoiser outputs are reused while z_t is unchanged
(``reuse_cache``); this is exact only for denoisers without time conditioning (the library's
backbones take no time input). The whole-sequence samplers re-run the whole sequence per
evaluation; :func:`cached_block_sample` runs one block.

EOS rule (``eos_fill``, on by default): PAD is never committed directly: at masked slots its
probability is added to EOS's (a padding prediction at slot j says the output has ended by j),
and once a row commits EOS every generated slot after its first EOS is set to PAD in the same
step. Without it a model that puts most mass on padding fills the end of the canvas first and
then commits EOS near the start (empty outputs); with PAD merely banned (mass dropped), it
fills every slot with real tokens instead (over-long outputs).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from slicjax.models import diffusion as dm
from slicjax.models import seq_model
from slicjax.models.diffusion import (
  EOS_ID,
  NEG_INF,
  PAD_ID,
  MaskingSchedule,
  as_schedule,
  substitution_logits,
)

Denoise = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class DiffusionSampleStats:
  """What a sampler did.

  Attributes:
    num_evals: ``[]`` int32, batched denoiser calls (network evaluations).
    num_steps: ``[]`` int32, loop iterations (evaluations plus reused steps).
    tokens_committed_B: ``[B]`` int32, masked positions filled in each row.
    tokens_per_eval_B: ``[B]`` float32, ``tokens_committed_B / num_evals``.
    commit_step_BxL: ``[B, L]`` int32, the iteration at which each position was filled
      (-1 for fixed positions).
    real_tokens_B: ``[B]`` int32, the output's real tokens: generated slots up to and
      including the first EOS that are not PAD (``tokens_committed_B`` counts every filled
      slot, padding included).
    row_evals_B: ``[B]`` int32, evaluations each row needed (the passes in which it still had
      masked slots: what decoding it alone would cost); ``num_evals`` is the batch's count.
      For the whole-sequence loops it is the iterations up to the row's last commit (exact for
      the confidence samplers, which commit in every iteration; an upper bound for ancestral
      sampling with ``reuse_cache``).
  """

  num_evals: jax.Array
  num_steps: jax.Array
  tokens_committed_B: jax.Array
  tokens_per_eval_B: jax.Array
  commit_step_BxL: jax.Array
  real_tokens_B: jax.Array
  row_evals_B: jax.Array


@flax.struct.dataclass
class _State:
  """Loop state. ``logits_BxLxV`` is the cached (substituted) denoiser output for
  ``cache_z_BxL``; ``block_B``/``steps_in_block_B`` track the LLaDA step budget."""

  step: jax.Array  # [] int32
  z_BxL: jax.Array  # [B, L] int32
  logits_BxLxV: jax.Array  # [B, L, V] float32
  cache_z_BxL: jax.Array  # [B, L] int32
  have_cache: jax.Array  # [] bool
  num_evals: jax.Array  # [] int32
  commit_step_BxL: jax.Array  # [B, L] int32
  block_B: jax.Array  # [B] int32
  steps_in_block_B: jax.Array  # [B] int32


def _prepare(name, denoise, tokens_BxL, fixed_mask_BxL, mask_id, temperature):
  tokens_BxL, fixed_mask_BxL = jnp.asarray(tokens_BxL), jnp.asarray(fixed_mask_BxL)
  if tokens_BxL.ndim != 2 or fixed_mask_BxL.shape != tokens_BxL.shape:
    raise ValueError(
      f"{name}: tokens must be [B, L] and fixed_mask the same shape, got {tokens_BxL.shape} and "
      f"{fixed_mask_BxL.shape}; fixed_mask is 1 on positions that must not change (the prompt)."
    )
  if not isinstance(mask_id, numbers.Integral) or mask_id < 0:
    raise ValueError(f"{name}: mask_id must be a non-negative int, got {mask_id!r}.")
  if not temperature >= 0:
    raise ValueError(f"{name}: temperature must be >= 0 (0 = greedy), got {temperature}.")
  fixed = fixed_mask_BxL != 0
  z = jnp.where(fixed, tokens_BxL, mask_id).astype(jnp.int32)
  b, length = z.shape
  out = jax.eval_shape(denoise, z, jnp.ones((b,), jnp.float32))
  if out.shape[:2] != (b, length) or len(out.shape) != 3 or out.shape[2] <= mask_id:
    raise ValueError(
      f"{name}: denoise returned shape {out.shape} for tokens {z.shape}; it must return logits "
      f"[B, L, V] with V > mask_id={mask_id}."
    )
  state = _State(
    step=jnp.zeros((), jnp.int32),
    z_BxL=z,
    logits_BxLxV=jnp.zeros(out.shape, jnp.float32),
    cache_z_BxL=z,
    have_cache=jnp.zeros((), bool),
    num_evals=jnp.zeros((), jnp.int32),
    commit_step_BxL=jnp.where(fixed, -1, jnp.iinfo(jnp.int32).max).astype(jnp.int32),
    block_B=jnp.full((b,), -1, jnp.int32),
    steps_in_block_B=jnp.zeros((b,), jnp.int32),
  )
  return fixed, state


def _masked(st: _State, fixed_BxL, mask_id):
  return (st.z_BxL == mask_id) & ~fixed_BxL


def _evaluate(denoise, st: _State, t_B, mask_id, reuse_cache):
  """(Substituted) logits for ``st.z_BxL``: recomputed unless the cached ones are for this z."""

  def compute(_):
    logits = substitution_logits(denoise(st.z_BxL, t_B), st.z_BxL, mask_id=mask_id)
    return logits.astype(jnp.float32), st.num_evals + 1

  if not reuse_cache:
    logits, evals = compute(None)
  else:
    stale = ~st.have_cache | jnp.any(st.z_BxL != st.cache_z_BxL)
    logits, evals = jax.lax.cond(stale, compute, lambda _: (st.logits_BxLxV, st.num_evals), None)
  return st.replace(
    logits_BxLxV=logits, cache_z_BxL=st.z_BxL, have_cache=jnp.ones((), bool), num_evals=evals
  )


def _ban_pad(logits_BxLxV, masked_BxL, eos_fill):
  """With ``eos_fill``, PAD is never committed directly: at masked slots its probability is
  moved to EOS (logit_EOS := log(e^logit_EOS + e^logit_PAD), logit_PAD := −∞).

  Under the prefix layout "PAD at slot j" means "the output ended before j", so the moved mass
  is the model's belief that the output ends by this slot; committing it as EOS ends the output
  there (:func:`_fill_after_eos` pads the rest). Dropping PAD's mass instead would force a
  real token wherever the model predicts padding (over-long outputs)."""
  if not eos_fill:
    return logits_BxLxV
  v = jnp.arange(logits_BxLxV.shape[-1])
  merged = jnp.logaddexp(logits_BxLxV[..., EOS_ID], logits_BxLxV[..., PAD_ID])
  out = jnp.where((v == EOS_ID)[None, None, :], merged[..., None], logits_BxLxV)
  out = jnp.where((v == PAD_ID)[None, None, :], NEG_INF, out)
  return jnp.where(masked_BxL[:, :, None], out, logits_BxLxV)


def _fill_after_eos(z_BxL, gen_BxL, gen_idx_BxL):
  """Every generated slot after a row's first committed EOS becomes PAD (committed or not);
  returns the new tokens and the slots that were masked and are now filled."""
  eos = gen_BxL & (z_BxL == EOS_ID)
  first_B = jnp.min(jnp.where(eos, gen_idx_BxL, jnp.iinfo(jnp.int32).max), axis=1)
  after = gen_BxL & (gen_idx_BxL > first_B[:, None])
  return jnp.where(after, PAD_ID, z_BxL), after


def _draw(key, logits_BxLxV, temperature):
  if temperature == 0:
    return jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BxLxV / temperature, axis=-1).astype(jnp.int32)


def _commit(st: _State, commit_BxL, x0_BxL, fixed_BxL=None, mask_id=None):
  """Writes the committed tokens; with ``fixed_BxL`` (``eos_fill``) every generated slot after
  the first EOS becomes PAD in the same step."""
  z = jnp.where(commit_BxL, x0_BxL, st.z_BxL)
  filled = commit_BxL
  if fixed_BxL is not None:
    gen = ~fixed_BxL
    z, after = _fill_after_eos(z, gen, jnp.cumsum(gen, axis=1) - 1)
    filled = commit_BxL | (after & (st.z_BxL == mask_id))
  return st.replace(
    z_BxL=z,
    commit_step_BxL=jnp.where(filled, st.step, st.commit_step_BxL),
    step=st.step + 1,
  )


def _select(rule, conf_BxL, window_BxL, *, threshold=None, factor=None, k_B=None, first_BxL=None):
  """The commit set of one step among the ``window`` positions (conf = −1 elsewhere).

  * ``topk``: the ``k_B`` most confident (stable ties: lower index first);
  * ``threshold`` (Fast-dLLM): every position with conf ≥ τ, and at least the most confident;
  * ``factor`` (Fast-dLLM): the n most confident, n the largest with (n + 1)(1 − c_(n)) < f
    (c sorted descending, c_(n) the n-th), at least one;
  * ``prefix``: the longest prefix of the window (from ``first_BxL``) with conf ≥ τ, at least
    its first position.
  """
  length = conf_BxL.shape[1]
  top = window_BxL & (jnp.arange(length)[None, :] == jnp.argmax(conf_BxL, axis=1)[:, None])
  if rule in ("topk", "factor"):
    rank = jnp.argsort(jnp.argsort(-conf_BxL, axis=1, stable=True), axis=1)
  if rule == "topk":
    return window_BxL & (rank < k_B[:, None])
  if rule == "threshold":
    return (window_BxL & (conf_BxL >= threshold)) | top
  if rule == "factor":
    c_sorted = -jnp.sort(-conf_BxL, axis=1)  # descending; −1 past the window's size
    n = jnp.arange(1, length + 1, dtype=jnp.float32)[None, :]
    ok = (c_sorted >= 0) & ((n + 1.0) * (1.0 - c_sorted) < factor)
    n_B = jnp.max(jnp.where(ok, n, 0.0), axis=1).astype(jnp.int32)
    return (window_BxL & (rank < n_B[:, None])) | top
  below = window_BxL & (conf_BxL < threshold)
  return (window_BxL & (jnp.cumsum(below, axis=1) == 0)) | first_BxL


def _real_tokens(z_BxL, gen_BxL):
  gen_idx = jnp.cumsum(gen_BxL, axis=1) - 1
  eos = gen_BxL & (z_BxL == EOS_ID)
  first_B = jnp.min(jnp.where(eos, gen_idx, jnp.iinfo(jnp.int32).max), axis=1)
  real = gen_BxL & (gen_idx <= first_B[:, None]) & (z_BxL != PAD_ID)
  return jnp.sum(real, axis=1).astype(jnp.int32)


def _finish(st: _State, fixed_BxL, row_evals_B=None):
  filled = (~fixed_BxL) & (st.commit_step_BxL != jnp.iinfo(jnp.int32).max)
  committed_B = jnp.sum(filled, axis=-1).astype(jnp.int32)
  if row_evals_B is None:  # one batched loop: every row takes part in every evaluation
    last_B = jnp.max(jnp.where(filled, st.commit_step_BxL, -1), axis=1)
    row_evals_B = jnp.minimum(last_B + 1, st.num_evals)
  stats = DiffusionSampleStats(
    num_evals=st.num_evals,
    num_steps=st.step,
    tokens_committed_B=committed_B,
    tokens_per_eval_B=committed_B / jnp.maximum(st.num_evals, 1).astype(jnp.float32),
    commit_step_BxL=jnp.where(fixed_BxL, -1, st.commit_step_BxL),
    real_tokens_B=_real_tokens(st.z_BxL, ~fixed_BxL),
    row_evals_B=row_evals_B.astype(jnp.int32),
  )
  return st.z_BxL, stats


def _draw_with_confidence(key, logits_BxLxV, window_BxL, temperature):
  """Drawn tokens and their probabilities (−1 outside the window)."""
  x0 = _draw(key, logits_BxLxV, temperature)
  probs = jax.nn.softmax(logits_BxLxV, axis=-1)
  conf = jnp.take_along_axis(probs, x0[:, :, None], axis=-1)[..., 0]
  return x0, jnp.where(window_BxL, conf, -1.0)


def _topk_count(window_BxL, done_B, steps_per_block):
  """LLaDA's per-step count: the block's masks spread evenly over the steps left (ceil)."""
  left_B = jnp.maximum(steps_per_block - done_B, 1)
  return (jnp.sum(window_BxL, axis=1) + left_B - 1) // left_B


def _check_rule(name, rule, threshold, factor):
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise ValueError(f"{name}: threshold must be in [0, 1], got {threshold}.")
  if rule == "factor" and not (isinstance(factor, numbers.Real) and factor > 0):
    raise ValueError(f"{name}: the factor rule needs factor > 0 (Fast-dLLM uses ~1), got "
                     f"{factor!r}.")


def _positive_int(name, **values):
  for k, v in values.items():
    if not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f"{name}: {k} must be an int >= 1, got {v!r}.")


def ancestral_sample(
  denoise: Denoise,
  tokens_BxL: jax.Array,
  fixed_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  mask_id: int,
  num_steps: int,
  schedule: MaskingSchedule | str = "linear",
  temperature: float = 1.0,
  reuse_cache: bool = True,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """Ancestral sampling of the reverse process on the grid t_j = 1 − j/T.

  From t to s < t each masked token is revealed with probability (α_s − α_t)/(1 − α_t), its
  value drawn from p_θ(x_i | z_t); the last step (s = 0) reveals everything left. With
  ``reuse_cache`` a step where nothing was revealed reuses the previous denoiser output, so the
  number of network evaluations is at most the number of distinct z_t (MDLM caching).

  Args:
    denoise: ``(z_BxL, t_B) -> logits_BxLxV``.
    tokens_BxL: values at the fixed positions (others are ignored and start masked).
    fixed_mask_BxL: 1 on positions that must not change.
    rng: PRNG key.
    mask_id: the [MASK] id.
    num_steps: T, the number of time steps.
    schedule: masking schedule α(t).
    temperature: softmax temperature of the token draws (0 = argmax).
    reuse_cache: reuse denoiser outputs while z_t is unchanged.
    eos_fill: PAD is never drawn at a masked slot (its probability is moved to EOS), and every
      generated slot after the first committed EOS becomes PAD.
  """
  name = "ancestral_sample"
  _positive_int(name, num_steps=num_steps)
  sched = as_schedule(schedule)
  fixed, state = _prepare(name, denoise, tokens_BxL, fixed_mask_BxL, mask_id, temperature)
  b, length = state.z_BxL.shape

  def cond(st):
    return (st.step < num_steps) & jnp.any(_masked(st, fixed, mask_id))

  def body(st):
    t = 1.0 - st.step.astype(jnp.float32) / num_steps
    s = 1.0 - (st.step + 1).astype(jnp.float32) / num_steps
    st = _evaluate(denoise, st, jnp.full((b,), t), mask_id, reuse_cache)
    k_tok, k_rev = jax.random.split(jax.random.fold_in(rng, st.step))
    masked = _masked(st, fixed, mask_id)
    x0 = _draw(k_tok, _ban_pad(st.logits_BxLxV, masked, eos_fill), temperature)
    p = jnp.where(st.step == num_steps - 1, 1.0, sched.reveal_probability(t, s))
    reveal = masked & (jax.random.uniform(k_rev, (b, length)) < p)
    return _commit(st, reveal, x0, fixed if eos_fill else None, mask_id)

  return _finish(jax.lax.while_loop(cond, body, state), fixed)


def _confidence_loop(
  name,
  denoise,
  tokens_BxL,
  fixed_mask_BxL,
  rng,
  *,
  mask_id,
  rule,
  block_length,
  threshold,
  steps_per_block,
  temperature,
  reuse_cache,
  eos_fill,
  factor=None,
):
  """Shared loop of the confidence-based samplers; ``rule`` picks the commit set."""
  fixed, state = _prepare(name, denoise, tokens_BxL, fixed_mask_BxL, mask_id, temperature)
  b, length = state.z_BxL.shape
  block_length = length if block_length is None else block_length
  steps_per_block = block_length if steps_per_block is None else steps_per_block
  _positive_int(name, block_length=block_length, steps_per_block=steps_per_block)
  _check_rule(name, rule, threshold, factor)
  gen_idx_BxL = jnp.cumsum(~fixed, axis=1) - 1  # index among the generated positions
  n_gen_B = jnp.maximum(jnp.sum(~fixed, axis=1), 1)

  def cond(st):
    return (st.step < length) & jnp.any(_masked(st, fixed, mask_id))

  def body(st):
    masked = _masked(st, fixed, mask_id)
    g0_B = jnp.min(jnp.where(masked, gen_idx_BxL, length), axis=1)  # first masked, per row
    if rule == "prefix":
      window = masked & (gen_idx_BxL < (g0_B + block_length)[:, None])
    else:
      block_B = g0_B // block_length
      window = masked & (gen_idx_BxL // block_length == block_B[:, None])
    t_B = jnp.sum(masked, axis=1) / n_gen_B
    st = _evaluate(denoise, st, t_B.astype(jnp.float32), mask_id, reuse_cache)
    logits = _ban_pad(st.logits_BxLxV, masked, eos_fill)
    x0, conf = _draw_with_confidence(jax.random.fold_in(rng, st.step), logits, window, temperature)
    k_B, first = None, None
    if rule == "topk":
      done_B = jnp.where(block_B == st.block_B, st.steps_in_block_B, 0)
      k_B = _topk_count(window, done_B, steps_per_block)
      st = st.replace(block_B=block_B, steps_in_block_B=done_B + 1)
    elif rule == "prefix":
      first = window & (gen_idx_BxL == g0_B[:, None])
    commit = _select(rule, conf, window, threshold=threshold, factor=factor, k_B=k_B,
                     first_BxL=first)
    return _commit(st, commit, x0, fixed if eos_fill else None, mask_id)

  return _finish(jax.lax.while_loop(cond, body, state), fixed)


def low_confidence_remasking_sample(
  denoise: Denoise,
  tokens_BxL: jax.Array,
  fixed_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  mask_id: int,
  block_length: int | None = None,
  steps_per_block: int | None = None,
  temperature: float = 0.0,
  reuse_cache: bool = True,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """LLaDA sampling with low-confidence remasking and semi-autoregressive blocks.

  The generated positions are cut into blocks of ``block_length``; only the first block that
  still has masks is decoded. Each step predicts every masked position, and commits the k most
  confident ones of the block (confidence = probability of the drawn token), k spreading the
  block's masks evenly over ``steps_per_block`` steps; the rest stay masked ("remasked").

  Args:
    denoise: ``(z_BxL, t_B) -> logits_BxLxV``.
    tokens_BxL: values at the fixed positions.
    fixed_mask_BxL: 1 on positions that must not change.
    rng: PRNG key (used when ``temperature > 0``).
    mask_id: the [MASK] id.
    block_length: block size in generated tokens (None: one block, no semi-AR).
    steps_per_block: denoising steps per block (None: ``block_length``, one token per step).
    temperature: temperature of the token draws (0 = argmax, LLaDA's default).
    reuse_cache: reuse the denoiser output while z is unchanged.
    eos_fill: PAD is never committed directly (its probability is moved to EOS at masked
      slots) and every generated slot after the first committed EOS becomes PAD.
  """
  return _confidence_loop(
    "low_confidence_remasking_sample",
    denoise,
    tokens_BxL,
    fixed_mask_BxL,
    rng,
    mask_id=mask_id,
    rule="topk",
    block_length=block_length,
    threshold=None,
    steps_per_block=steps_per_block,
    temperature=temperature,
    reuse_cache=reuse_cache,
    eos_fill=eos_fill,
  )


def confidence_threshold_sample(
  denoise: Denoise,
  tokens_BxL: jax.Array,
  fixed_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  mask_id: int,
  threshold: float = 0.9,
  block_length: int | None = None,
  temperature: float = 0.0,
  reuse_cache: bool = True,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """Fast-dLLM confidence-aware parallel decoding.

  Per step, within the current block, every masked position whose confidence is ≥ τ is
  committed, and always at least the most confident one; τ = 1 decodes one token per step.

  Args:
    denoise: ``(z_BxL, t_B) -> logits_BxLxV``.
    tokens_BxL: values at the fixed positions.
    fixed_mask_BxL: 1 on positions that must not change.
    rng: PRNG key (used when ``temperature > 0``).
    mask_id: the [MASK] id.
    threshold: τ ∈ [0, 1].
    block_length: semi-autoregressive block size (None: one block).
    temperature: temperature of the token draws (0 = argmax).
    reuse_cache: reuse the denoiser output while z is unchanged.
    eos_fill: PAD is never committed directly (its probability is moved to EOS at masked
      slots) and every generated slot after the first committed EOS becomes PAD.
  """
  return _confidence_loop(
    "confidence_threshold_sample",
    denoise,
    tokens_BxL,
    fixed_mask_BxL,
    rng,
    mask_id=mask_id,
    rule="threshold",
    block_length=block_length,
    threshold=threshold,
    steps_per_block=None,
    temperature=temperature,
    reuse_cache=reuse_cache,
    eos_fill=eos_fill,
  )


def confident_prefix_sample(
  denoise: Denoise,
  tokens_BxL: jax.Array,
  fixed_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  mask_id: int,
  block_length: int,
  threshold: float = 0.9,
  temperature: float = 0.0,
  reuse_cache: bool = True,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """Variable-length block decoding (SDLM-style next-sequence prediction).

  The window is the ``block_length`` generated positions starting at the first masked one; per
  step the longest prefix of the window whose confidences are all ≥ τ is committed (at least
  its first token), and the window slides to the next masked position. Tokens are therefore
  committed left to right, a variable number per step.

  Args:
    denoise: ``(z_BxL, t_B) -> logits_BxLxV``.
    tokens_BxL: values at the fixed positions.
    fixed_mask_BxL: 1 on positions that must not change.
    rng: PRNG key (used when ``temperature > 0``).
    mask_id: the [MASK] id.
    block_length: window size in generated tokens.
    threshold: τ ∈ [0, 1].
    temperature: temperature of the token draws (0 = argmax).
    reuse_cache: reuse the denoiser output while z is unchanged.
    eos_fill: PAD is never committed directly (its probability is moved to EOS at masked
      slots) and every generated slot after the first committed EOS becomes PAD.
  """
  return _confidence_loop(
    "confident_prefix_sample",
    denoise,
    tokens_BxL,
    fixed_mask_BxL,
    rng,
    mask_id=mask_id,
    rule="prefix",
    block_length=block_length,
    threshold=threshold,
    steps_per_block=None,
    temperature=temperature,
    reuse_cache=reuse_cache,
    eos_fill=eos_fill,
  )


def confidence_factor_sample(
  denoise: Denoise,
  tokens_BxL: jax.Array,
  fixed_mask_BxL: jax.Array,
  rng: jax.Array,
  *,
  mask_id: int,
  factor: float = 1.0,
  block_length: int | None = None,
  temperature: float = 0.0,
  reuse_cache: bool = True,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """Fast-dLLM's factor-based parallel decoding.

  Per step, within the current block, with the masked positions' confidences sorted
  descending c_(1) ≥ c_(2) ≥ ..., the n most confident are committed, n the largest with
  (n + 1)(1 − c_(n)) < f, and at least one. A larger f commits more per step.

  Args:
    denoise: ``(z_BxL, t_B) -> logits_BxLxV``.
    tokens_BxL: values at the fixed positions.
    fixed_mask_BxL: 1 on positions that must not change.
    rng: PRNG key (used when ``temperature > 0``).
    mask_id: the [MASK] id.
    factor: f > 0.
    block_length: semi-autoregressive block size (None: one block).
    temperature: temperature of the token draws (0 = argmax).
    reuse_cache: reuse the denoiser output while z is unchanged.
    eos_fill: PAD is never committed directly (its probability is moved to EOS at masked
      slots) and every generated slot after the first committed EOS becomes PAD.

  Reference: Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV
  Cache and Parallel Decoding" (2025).
  """
  return _confidence_loop(
    "confidence_factor_sample", denoise, tokens_BxL, fixed_mask_BxL, rng, mask_id=mask_id,
    rule="factor", block_length=block_length, threshold=None, steps_per_block=None,
    temperature=temperature, reuse_cache=reuse_cache, eos_fill=eos_fill, factor=factor,
  )


def cached_block_sample(
  lm: dm.DiffusionLM,
  params,
  inputs_BxS: jax.Array,
  rng: jax.Array,
  *,
  target_len: int,
  rule: str = "threshold",
  threshold: float = 0.9,
  factor: float = 1.0,
  steps_per_block: int | None = None,
  temperature: float = 0.0,
  eos_fill: bool = True,
) -> tuple[jax.Array, DiffusionSampleStats]:
  """Block diffusion decoding with a KV cache, for a block-causal :class:`DiffusionLM`.

  The canvas of ``target_len`` slots after ``inputs + [BOS]`` (:func:`prefix_layout`) is
  decoded block by block, left to right (blocks of ``lm.block_length`` slots). Because a block
  only attends to itself and earlier blocks (:func:`slicjax.models.diffusion.block_ids`), the
  keys and values of the prompt and of committed blocks are exactly those of the full-sequence
  model, so they are computed once:

  1. prefill: one decode-mode pass over the prompt (ragged prompts: keys past a row's prompt
     masked, then each row's cache position reset to its own prompt length);
  2. each denoising step of block k runs only the block's ``block_length`` positions as one
     chunk against the cache (bidirectional inside the chunk), and the cache update is dropped;
     the commit rule picks the slots to fill (``rule``: ``threshold`` τ, ``factor`` f, or
     ``topk`` with ``steps_per_block`` steps: LLaDA's even split);
  3. the pass that writes block k's keys/values is fused with block k+1's first denoising pass
     (one chunk of 2 blocks, block-causal inside), so every network evaluation is a denoising
     evaluation; the last block's keys are never needed.

  With ``lm.shift`` the chunk of block k starts one position earlier (position j − 1 gives slot
  j's logits), i.e. it holds the last committed token before the block. Rows decode in lockstep
  per block (a row whose block is complete idles, its output unaffected);
  ``stats.row_evals_B`` counts the passes each row needed (what decoding it alone costs) and
  ``stats.num_evals`` the batch's passes. The prefill pass is not counted (the autoregressive
  decoder's prompt pass is not either). Outputs equal the uncached samplers (e.g.
  :func:`confidence_threshold_sample` with ``block_length = lm.block_length``) on the
  full-sequence block-causal denoiser, up to floating-point ties.

  Args:
    lm: a DiffusionLM with ``block_length`` set and a ``TransformerLM`` backbone.
    params: its parameters.
    inputs_BxS: prompts, right-padded with 0.
    rng: PRNG key (used when ``temperature > 0``).
    target_len: canvas slots L, a multiple of ``lm.block_length``.
    rule: ``threshold``, ``factor`` or ``topk``.
    threshold: τ of the threshold rule.
    factor: f of the factor rule.
    steps_per_block: steps per block of the ``topk`` rule (None: block_length, one token per
      step).
    temperature: temperature of the token draws (0 = argmax).
    eos_fill: PAD never committed directly; slots after the first EOS become PAD.

  Returns:
    ``(tokens_BxL, stats)``: the L canvas slots (not the prompt) and the statistics (its
    ``commit_step_BxL`` is over the canvas).
  """
  name = "cached_block_sample"
  lb = lm.block_length
  if lb is None:
    raise ValueError(f"{name}: the model is not block-causal (block_length=None); its canvas "
                     "attends to every slot, so no block's keys can be cached. Set block_length.")
  _positive_int(name, target_len=target_len)
  if target_len % lb:
    raise ValueError(f"{name}: target_len={target_len} is not a multiple of the model's "
                     f"block_length={lb}; choose a target_len (or block_length) that divides.")
  if rule not in ("threshold", "factor", "topk"):
    raise ValueError(f"{name}: unknown rule {rule!r}; use 'threshold', 'factor' or 'topk'.")
  _check_rule(name, rule, threshold, factor)
  steps_per_block = lb if steps_per_block is None else steps_per_block
  _positive_int(name, steps_per_block=steps_per_block)
  if not temperature >= 0:
    raise ValueError(f"{name}: temperature must be >= 0 (0 = greedy), got {temperature}.")
  mask_id = lm.mask_id
  module = lm.backbone
  inputs_BxS = jnp.asarray(inputs_BxS, jnp.int32)
  b, s = inputs_BxS.shape
  length = target_len
  x_BxT, _ = dm.prefix_layout(inputs_BxS, target_len=length, mask_id=mask_id)
  total = x_BxT.shape[1]
  cfg = getattr(module, "cfg", None)
  if cfg is None or not hasattr(type(module), "hidden_states"):
    raise ValueError(f"{name}: the backbone must be a TransformerLM (decode-mode chunks with an "
                     "attention mask); got {type(module).__name__}.")
  if total + lb > cfg.max_len and cfg.position == "learned":
    raise ValueError(f"{name}: inputs + 1 + target_len + block_length = {total + lb} exceeds "
                     f"the learned position table ({cfg.max_len}); shorten the request.")
  if cfg.position != "learned":  # a cache of the slots this request needs
    module = module.clone(cfg=dataclasses.replace(cfg, max_len=total + lb))
  s_B = jnp.sum(inputs_BxS != PAD_ID, axis=1).astype(jnp.int32)
  n_B = s_B + (0 if lm.shift else 1)  # first position whose output is a canvas slot's logits

  def apply(cache, tokens_BxQ, mask_BxQxQ):
    h, mut = module.apply(
      {"params": params, "cache": cache}, tokens_BxQ, decode=True,
      attention_mask_BxLxL=mask_BxQxQ, mutable=["cache"], method=type(module).hidden_states,
    )
    logits = module.apply({"params": params}, h, method=type(module).logits_from_hidden)
    return logits, mut["cache"]

  def init_cache(r, t):
    return module.init(r, t, decode=True, attention_mask_BxLxL=jnp.ones((b, 1, 1), bool))

  shapes = jax.eval_shape(init_cache, jax.random.PRNGKey(0), jnp.zeros((b, 1), jnp.int32))
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(shapes["cache"]))
  # 1. prefill positions 0 .. n_B - 1 (prompt; + BOS without shift)
  pre = x_BxT[:, : s + 1]
  q = jnp.arange(s + 1)
  pre_mask = jnp.broadcast_to(q[None, None, :] < n_B[:, None, None], (b, s + 1, s + 1))
  if lm.causal_prompt:
    pre_mask = pre_mask & (q[None, :] <= q[:, None])[None]
  _, cache = apply(cache, pre, pre_mask)
  cache = seq_model._set_cache_position(cache, n_B)

  slot = jnp.arange(length)[None, :]
  canvas = jnp.ones((b, length), bool)
  z_BxL = jnp.full((b, length), mask_id, jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  commit_step = jnp.full((b, length), big, jnp.int32)
  row_evals = jnp.zeros((b,), jnp.int32)
  num_evals = jnp.zeros((), jnp.int32)
  step = jnp.zeros((), jnp.int32)
  ones_1 = jnp.ones((b, lb, lb), bool)
  two = jnp.arange(2 * lb) // lb
  ones_2 = jnp.broadcast_to(two[None, :] <= two[:, None], (b, 2 * lb, 2 * lb))

  def chunk_tokens(z_BxL, k, width):
    """Layout tokens at positions n_B + k*lb .. + width - 1 with the canvas's current values."""
    x = jnp.where(
      (jnp.arange(total)[None, :] >= s_B[:, None] + 1)
      & (jnp.arange(total)[None, :] <= s_B[:, None] + length),
      jnp.take_along_axis(z_BxL, jnp.clip(jnp.arange(total)[None, :] - s_B[:, None] - 1, 0,
                                          length - 1), axis=1),
      x_BxT,
    )
    idx = n_B[:, None] + k * lb + jnp.arange(width)[None, :]
    return jnp.take_along_axis(x, jnp.clip(idx, 0, total - 1), axis=1)

  for k in range(length // lb):
    in_block = (slot >= k * lb) & (slot < (k + 1) * lb)
    blk = slice(k * lb, (k + 1) * lb)
    needs_B = jnp.any(in_block & (z_BxL == mask_id), axis=1)
    if k == 0:
      logits, _ = apply(cache, chunk_tokens(z_BxL, 0, lb), ones_1)
    else:  # write block k-1's keys/values and evaluate block k in one pass
      logits2, cache2 = apply(cache, chunk_tokens(z_BxL, k - 1, 2 * lb), ones_2)
      cache = seq_model._set_cache_position(cache2, n_B + k * lb)
      logits = logits2[:, lb:]
    row_evals = row_evals + needs_B
    num_evals = num_evals + 1
    carry = (z_BxL, commit_step, row_evals, num_evals, step, logits, jnp.ones((), bool),
             jnp.zeros((b,), jnp.int32))

    def cond(c, in_block=in_block):
      return jnp.any(in_block & (c[0] == mask_id))

    def body(c, k=k, in_block=in_block, blk=blk, cache=cache):
      z, cstep, revals, nevals, st, logits, fresh, done_B = c
      masked = in_block & (z == mask_id)
      has_B = jnp.any(masked, axis=1)

      def evaluate(_):
        out, _ = apply(cache, chunk_tokens(z, k, lb), ones_1)
        return out

      logits = jax.lax.cond(fresh, lambda _: logits, evaluate, None)
      revals = revals + jnp.where(fresh, 0, has_B)
      nevals = nevals + jnp.where(fresh, 0, 1)
      sub = substitution_logits(logits, z[:, blk], mask_id=mask_id)
      sub = _ban_pad(sub, masked[:, blk], eos_fill)
      x0, conf = _draw_with_confidence(
        jax.random.fold_in(rng, st), sub, masked[:, blk], temperature
      )
      k_B = _topk_count(masked[:, blk], done_B, steps_per_block) if rule == "topk" else None
      commit = _select(rule, conf, masked[:, blk], threshold=threshold, factor=factor, k_B=k_B)
      commit_full = jnp.zeros((b, length), bool).at[:, blk].set(commit)
      x0_full = jnp.zeros((b, length), jnp.int32).at[:, blk].set(x0)
      new_z = jnp.where(commit_full, x0_full, z)
      filled = commit_full
      if eos_fill:
        new_z, after = _fill_after_eos(new_z, canvas, jnp.broadcast_to(slot, (b, length)))
        filled = filled | (after & (z == mask_id))
      cstep = jnp.where(filled, st, cstep)
      return (new_z, cstep, revals, nevals, st + 1, logits, jnp.zeros((), bool),
              done_B + has_B)

    z_BxL, commit_step, row_evals, num_evals, step, _, _, _ = jax.lax.while_loop(
      cond, body, carry
    )

  committed_B = jnp.sum(commit_step != big, axis=1).astype(jnp.int32)
  stats = DiffusionSampleStats(
    num_evals=num_evals,
    num_steps=step,
    tokens_committed_B=committed_B,
    tokens_per_eval_B=committed_B / jnp.maximum(row_evals, 1).astype(jnp.float32),
    commit_step_BxL=commit_step,
    real_tokens_B=_real_tokens(z_BxL, canvas),
    row_evals_B=row_evals,
  )
  return z_BxL, stats
