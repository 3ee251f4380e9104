"""RSO statistical rejection sampling: draw from π_r ∝ π_sft · exp(r / β) using samples of π_sft.

Per prompt, ``N`` candidates sampled from π_sft with rewards ``r_i`` are thinned to ``M``
accepted ones by rounds of rejection sampling::

  while fewer than M accepted and rounds < max_rounds:
    r_max = max reward among the remaining candidates
    visit the remaining candidates in a fresh uniformly random order; for each:
      u ~ U[0, 1); accept (and remove) it if u < exp((r_i − r_max) / β); stop at M

The random visiting order makes the result independent of how the ``N`` candidates are
ordered (beam-ordered or score-sorted inputs do not bias it); for i.i.d. samples it is the
same algorithm as visiting them in index order. The remaining candidate with the highest
reward is always accepted (``exp(0) = 1 > u``), so every round accepts at least one candidate
and ``max_rounds = M`` always fills ``M`` slots when ``M`` valid candidates exist.

β → 0 keeps the top-M by reward; β → ∞ keeps a uniformly random subset (plain π_sft samples).

References: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization",
ICLR 2024 (arXiv 2309.06657).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check(rewards_BxN, mask_BxN, beta, name):
  rewards_BxN, mask_BxN = jnp.asarray(rewards_BxN), jnp.asarray(mask_BxN)
  if rewards_BxN.ndim != 2 or rewards_BxN.shape != mask_BxN.shape:
    raise ValueError(
      f"{name}: rewards {rewards_BxN.shape} and mask {mask_BxN.shape} must both be [B, N] (one "
      "row of candidate rewards per prompt)."
    )
  if not isinstance(beta, jax.core.Tracer) and not beta > 0:
    raise ValueError(f"{name}: beta must be > 0 (float('inf') allowed), got {beta}.")
  valid = mask_BxN.astype(bool)
  rewards = jnp.where(valid, rewards_BxN, 0.0).astype(jnp.float32)
  return rewards, valid


def _max_over(rewards_BxN, where_BxN):
  top = jnp.max(jnp.where(where_BxN, rewards_BxN, -jnp.inf), axis=-1)
  return jnp.where(jnp.isfinite(top), top, 0.0)


def _accept_prob(rewards_BxN, r_max_B, beta):
  gap = rewards_BxN - r_max_B[:, None]
  return jnp.exp(jnp.minimum(gap, 0.0) / beta)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _rso_sample(rng, rewards, valid, beta, m: int, max_rounds: int):
  """Compiled body of :func:`rso_sample`."""
  b, n = rewards.shape
  rows_Bx1 = jnp.arange(b)[:, None]
  pos_1xN = jnp.arange(n)[None, :]

  def cond(state):
    rnd, remaining, _, count = state
    return (rnd < max_rounds) & jnp.any((count < m) & jnp.any(remaining, axis=-1))

  def body(state):
    rnd, remaining, accepted, count = state
    k_u, k_order = jax.random.split(jax.random.fold_in(rng, rnd))
    r_max = _max_over(rewards, remaining)
    u = jax.random.uniform(k_u, (b, n))
    passes = remaining & (u < _accept_prob(rewards, r_max, beta))
    # Passing candidates first, in random order; acceptance follows that order up to M.
    order = jnp.argsort(jnp.where(passes, jax.random.uniform(k_order, (b, n)), 2.0), axis=-1)
    take = jnp.minimum(jnp.sum(passes, axis=-1), m - count)
    took_BxN = pos_1xN < take[:, None]  # position j of `order` is accepted
    slot = jnp.where(took_BxN, count[:, None] + pos_1xN, m)  # slot m is dropped
    accepted = accepted.at[rows_Bx1, slot].set(order.astype(jnp.int32), mode="drop")
    removed = jnp.zeros((b, n), bool).at[rows_Bx1, order].set(took_BxN)
    return rnd + 1, remaining & ~removed, accepted, count + take

  init = (jnp.int32(0), valid, jnp.full((b, m), -1, jnp.int32), jnp.zeros((b,), jnp.int32))
  _, _, accepted, count = jax.lax.while_loop(cond, body, init)
  return accepted, count


def rso_sample(
  rng: jax.Array,
  rewards_BxN: jax.Array,
  mask_BxN: jax.Array,
  *,
  num_accept: int,
  beta: float,
  max_rounds: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Statistical rejection sampling of ``num_accept`` candidates per prompt (jit-compatible).

  Args:
    rng: PRNG key.
    rewards_BxN: reward ``r(x, y_i)`` of each candidate.
    mask_BxN: 1/True for real candidates; masked ones are never accepted.
    num_accept: ``M``, the number of candidates to accept per prompt.
    beta: β > 0, the temperature of the tilt ``exp(r / β)`` (RSO default 0.5).
    max_rounds: maximum number of rounds (default ``M``, which always suffices, see the module
      docstring).

  Returns:
    ``(accepted_BxM, count_B)``: ``int32`` indices into ``N`` in order of acceptance, ``-1``
    in the slots left empty (fewer than ``M`` valid candidates, or ``max_rounds`` reached), and
    the number of accepted candidates.

  References: Liu et al., ICLR 2024 (arXiv 2309.06657), Algorithm 1.
  """
  rewards, valid = _check(rewards_BxN, mask_BxN, beta, "rso_sample")
  if not isinstance(num_accept, int) or num_accept < 1:
    raise ValueError(f"rso_sample: num_accept must be an int >= 1, got {num_accept!r}.")
  max_rounds = num_accept if max_rounds is None else max_rounds
  if not isinstance(max_rounds, int) or max_rounds < 1:
    raise ValueError(f"rso_sample: max_rounds must be an int >= 1, got {max_rounds!r}.")
  return _rso_sample(rng, rewards, valid, jnp.float32(beta), num_accept, max_rounds)


def expected_acceptance_rate(
  rewards_BxN: jax.Array,
  mask_BxN: jax.Array,
  *,
  beta: float,
) -> jax.Array:
  """Monte Carlo estimate of the first-round acceptance rate per prompt.

  .. math::

    \\mathbb{E}_{y \\sim \\pi_{sft}}\\bigl[\\exp((r(x,y) - r_{max}) / \\beta)\\bigr]
      \\approx \\frac{1}{N}\\sum_i \\exp((r_i - r_{max}) / \\beta)

  with ``r_max`` the largest valid reward and the mean over valid candidates (``0`` when a
  prompt has none). The expected number of first-round acceptances is ``N_valid`` times it.

  Returns:
    ``[B]`` rate in ``(0, 1]``.

  References: Liu et al., ICLR 2024 (arXiv 2309.06657).
  """
  rewards, valid = _check(rewards_BxN, mask_BxN, beta, "expected_acceptance_rate")
  prob = jnp.where(valid, _accept_prob(rewards, _max_over(rewards, valid), beta), 0.0)
  return jnp.sum(prob, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)
