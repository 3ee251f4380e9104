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

Blocks are counted over the generated (non-fixed) positions of each row in order, so prompts of
different lengths share one static shape. Denoiser outputs are reused while z_t is unchanged
(``reuse_cache``); this is exact only for denoisers without time conditioning (the library's
backbones take no time input). The re-run is over the whole sequence: there is no block KV cache.
"""

from __future__ import annotations

import numbers
from typing import Callable

import flax
import jax
import jax.numpy as jnp

from slicjax.models.diffusion import MaskingSchedule, as_schedule, substitution_logits

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
  """

  num_evals: jax.Array
  num_steps: jax.Array
  tokens_committed_B: jax.Array
  tokens_per_eval_B: jax.Array
  commit_step_BxL: jax.Array


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


def _draw(key, logits_BxLxV, temperature):
  if temperature == 0:
    return jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BxLxV / temperature, axis=-1).astype(jnp.int32)


def _commit(st: _State, commit_BxL, x0_BxL):
  return st.replace(
    z_BxL=jnp.where(commit_BxL, x0_BxL, st.z_BxL),
    commit_step_BxL=jnp.where(commit_BxL, st.step, st.commit_step_BxL),
    step=st.step + 1,
  )


def _finish(st: _State, fixed_BxL):
  filled = (~fixed_BxL) & (st.commit_step_BxL != jnp.iinfo(jnp.int32).max)
  committed_B = jnp.sum(filled, axis=-1).astype(jnp.int32)
  stats = DiffusionSampleStats(
    num_evals=st.num_evals,
    num_steps=st.step,
    tokens_committed_B=committed_B,
    tokens_per_eval_B=committed_B / jnp.maximum(st.num_evals, 1).astype(jnp.float32),
    commit_step_BxL=jnp.where(fixed_BxL, -1, st.commit_step_BxL),
  )
  return st.z_BxL, stats


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
    x0 = _draw(k_tok, st.logits_BxLxV, temperature)
    p = jnp.where(st.step == num_steps - 1, 1.0, sched.reveal_probability(t, s))
    reveal = _masked(st, fixed, mask_id) & (jax.random.uniform(k_rev, (b, length)) < p)
    return _commit(st, reveal, x0)

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
):
  """Shared loop of the confidence-based samplers; ``rule`` picks the commit set."""
  fixed, state = _prepare(name, denoise, tokens_BxL, fixed_mask_BxL, mask_id, temperature)
  b, length = state.z_BxL.shape
  block_length = length if block_length is None else block_length
  steps_per_block = block_length if steps_per_block is None else steps_per_block
  _positive_int(name, block_length=block_length, steps_per_block=steps_per_block)
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise ValueError(f"{name}: threshold must be in [0, 1], got {threshold}.")
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
    x0 = _draw(jax.random.fold_in(rng, st.step), st.logits_BxLxV, temperature)
    probs = jax.nn.softmax(st.logits_BxLxV, axis=-1)
    conf = jnp.where(window, jnp.take_along_axis(probs, x0[:, :, None], axis=-1)[..., 0], -1.0)
    top = window & (jnp.arange(length)[None, :] == jnp.argmax(conf, axis=1)[:, None])
    if rule == "topk":
      done_B = jnp.where(block_B == st.block_B, st.steps_in_block_B, 0)
      left_B = jnp.maximum(steps_per_block - done_B, 1)
      k_B = (jnp.sum(window, axis=1) + left_B - 1) // left_B  # ceil: even split, extras first
      rank = jnp.argsort(jnp.argsort(-conf, axis=1, stable=True), axis=1)
      commit = window & (rank < k_B[:, None])
      st = st.replace(block_B=block_B, steps_in_block_B=done_B + 1)
    elif rule == "threshold":
      commit = (window & (conf >= threshold)) | top
    else:
      below = window & (conf < threshold)
      first = window & (gen_idx_BxL == g0_B[:, None])
      commit = (window & (jnp.cumsum(below, axis=1) == 0)) | first
    return _commit(st, commit, x0)

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
  )
