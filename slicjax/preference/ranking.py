"""Turning ``M`` scored candidates per prompt into (chosen, rejected) preference pairs.

Two labelings from RSO / SLiC-HF:

* :func:`tournament_pairs` — a single-elimination tournament: ``M − 1`` matches, each giving
  the pair (winner, loser). With ``M`` not a power of two the last bracket position gets a bye
  in the rounds where the field is odd.
* :func:`first_round_pairs` — ``⌊M/2⌋`` random disjoint pairs, each labeled by one comparison.

Who wins a match comes from one of three judges:

* pointwise scores ``scores_BxM`` (a reward per candidate): ``i`` beats ``j`` if
  ``s_i > s_j``;
* a pairwise preference matrix ``pref_BxMxM`` with ``pref[b, i, j] = P(i beats j)``: ``i``
  beats ``j`` if ``pref[i, j] > pref[j, i]`` (both orders are read, so a ranker with position
  bias is symmetrized; for a consistent matrix this is ``P(i beats j) > 0.5``);
* a callable ``compare(left_BxP, right_BxP) -> [B, P]`` returning ``P(left beats right)``
  (e.g. a pairwise ranking model run on the fly): ``left`` wins if it is ``> 0.5``. Pass
  ``mask_BxM`` with it (it gives ``B`` and ``M``).

Returned indices are positions ``0..M-1`` in the candidate axis. A pair is marked ``-1`` in
both outputs when it carries no preference: the judge ties, or either candidate is masked out
(``mask_BxM``, e.g. ``accepted_BxM >= 0`` from :func:`~slicjax.preference.rejection_sampling.
rso_sample`). In a tournament a valid candidate always advances past a masked one, and on a tie
the left (earlier bracket position) candidate advances.

References: Zhao et al., "SLiC-HF", 2023 (arXiv 2305.10425); Liu et al., "Statistical
Rejection Sampling Improves Preference Optimization", ICLR 2024 (arXiv 2309.06657).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Judge = jax.Array | Callable[[jax.Array, jax.Array], jax.Array]


def _judge(judge: Judge, mask_BxM):
  """Returns ``(match, valid_BxM)``, ``match(left_BxP, right_BxP) -> (left_wins, decided)``."""
  if callable(judge):
    if mask_BxM is None:
      raise ValueError(
        "a compare function needs mask_BxM (jnp.ones((B, M)) when every candidate is real): "
        "it gives the batch size and M."
      )

    def match(left, right):
      p = jnp.asarray(judge(left, right), jnp.float32)
      if p.shape != left.shape:
        raise ValueError(
          f"compare returned shape {p.shape} for index arrays of shape {left.shape}; it must "
          "return one P(left beats right) per pair."
        )
      return p > 0.5, p != 0.5

    return match, _valid(mask_BxM, jnp.asarray(mask_BxM).shape)
  arr = jnp.asarray(judge)
  if arr.ndim == 2:

    def match(left, right):
      sl = jnp.take_along_axis(arr, left, axis=1)
      sr = jnp.take_along_axis(arr, right, axis=1)
      return sl >= sr, sl != sr

    return match, _valid(mask_BxM, arr.shape)
  if arr.ndim == 3 and arr.shape[1] == arr.shape[2]:
    rows = jnp.arange(arr.shape[0])[:, None]

    def match(left, right):
      p_lr, p_rl = arr[rows, left, right], arr[rows, right, left]
      return p_lr >= p_rl, p_lr != p_rl

    return match, _valid(mask_BxM, arr.shape[:2])
  raise ValueError(
    f"judge must be pointwise scores [B, M], a preference matrix [B, M, M] or a callable; got "
    f"an array of shape {arr.shape}."
  )


def _valid(mask_BxM, shape):
  if mask_BxM is None:
    return jnp.ones(shape, bool)
  valid = jnp.asarray(mask_BxM).astype(bool)
  if valid.ndim != 2 or valid.shape != tuple(shape):
    raise ValueError(f"mask_BxM has shape {valid.shape}, expected [B, M] = {tuple(shape)}.")
  return valid


def _play(match, valid_BxM, left_BxP, right_BxP):
  """One vectorized round of matches: ``(winner, loser, pair_ok)``."""
  wins, decided = match(left_BxP, right_BxP)
  vl = jnp.take_along_axis(valid_BxM, left_BxP, axis=1)
  vr = jnp.take_along_axis(valid_BxM, right_BxP, axis=1)
  wins = jnp.where(vl & vr, wins, vl)
  winner = jnp.where(wins, left_BxP, right_BxP)
  loser = jnp.where(wins, right_BxP, left_BxP)
  return winner, loser, vl & vr & decided


def _random_order(rng, b, m):
  return jnp.argsort(jax.random.uniform(rng, (b, m)), axis=-1).astype(jnp.int32)


def tournament_pairs(
  judge: Judge,
  *,
  mask_BxM: jax.Array | None = None,
  rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Single-elimination tournament labeling: ``M − 1`` (winner, loser) pairs per prompt.

  Args:
    judge: ``scores_BxM``, ``pref_BxMxM`` or a ``compare`` callable (module docstring).
    mask_BxM: 1/True for real candidates (default: all real; required with a callable).
    rng: if given, the bracket is a random permutation of the candidates per prompt;
      otherwise position ``p`` of the bracket holds candidate ``p``.

  Returns:
    ``(chosen_idx_BxP, rejected_idx_BxP)`` ``int32`` with ``P = M − 1``, round by round,
    ``-1`` where a match carried no preference.

  References: Zhao et al., "SLiC-HF", 2023 (arXiv 2305.10425); Liu et al., ICLR 2024
  (arXiv 2309.06657), tournament-rank.
  """
  match, valid = _judge(judge, mask_BxM)
  b, m = valid.shape
  if m < 2:
    raise ValueError(f"tournament_pairs needs at least 2 candidates per prompt, got M={m}.")
  if rng is not None:
    field = _random_order(rng, b, m)
  else:
    field = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :], (b, m))
  chosen, rejected = [], []
  while field.shape[1] > 1:
    half = field.shape[1] // 2
    winner, loser, ok = _play(match, valid, field[:, 0 : 2 * half : 2], field[:, 1 : 2 * half : 2])
    chosen.append(jnp.where(ok, winner, -1))
    rejected.append(jnp.where(ok, loser, -1))
    field = jnp.concatenate([winner, field[:, 2 * half :]], axis=1)  # odd one out: a bye
  return jnp.concatenate(chosen, axis=1), jnp.concatenate(rejected, axis=1)


def first_round_pairs(
  judge: Judge,
  *,
  rng: jax.Array,
  mask_BxM: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """First-round labeling: ``⌊M/2⌋`` random disjoint pairs per prompt, labeled by the judge.

  Args:
    judge: ``scores_BxM``, ``pref_BxMxM`` or a ``compare`` callable (module docstring).
    rng: PRNG key for the random pairing (required).
    mask_BxM: 1/True for real candidates (default: all real; required with a callable).

  Returns:
    ``(chosen_idx_BxP, rejected_idx_BxP)`` ``int32`` with ``P = ⌊M/2⌋``, ``-1`` where a pair
    carried no preference. With ``M`` odd one random candidate sits out.

  References: Liu et al., ICLR 2024 (arXiv 2309.06657), first-round-rank.
  """
  if rng is None:
    raise ValueError("first_round_pairs needs rng=jax.random.PRNGKey(...) for the pairing.")
  match, valid = _judge(judge, mask_BxM)
  b, m = valid.shape
  if m < 2:
    raise ValueError(f"first_round_pairs needs at least 2 candidates per prompt, got M={m}.")
  order = _random_order(rng, b, m)
  half = m // 2
  winner, loser, ok = _play(match, valid, order[:, 0 : 2 * half : 2], order[:, 1 : 2 * half : 2])
  return jnp.where(ok, winner, -1), jnp.where(ok, loser, -1)
