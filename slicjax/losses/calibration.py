"""SLiC calibration losses over one input's candidate set.

Every loss takes the policy's sequence log-likelihoods ``logp_BxK`` of ``K`` candidates per
input, their similarity to the target ``sim_BxK`` and a validity mask ``mask_BxK`` (``0`` or
``False`` for padding candidates), and returns ``(loss_B, num_pairs_B)``:

* ``loss_B`` — the unreduced per-input loss (reduce at the call site);
* ``num_pairs_B`` — ``int32``, the number of candidate pairs ``(i, j)`` that carried a signal,
  i.e. with both candidates valid and ``sim_i > sim_j`` **strictly**. An input whose valid
  candidates all tie in similarity (or with fewer than two valid candidates) has
  ``num_pairs == 0`` and contributes loss ``0`` (and no gradient) to the pairwise losses; log
  ``mean(num_pairs == 0)`` to see how much of a batch is inert.

Entries of ``logp_BxK`` and ``sim_BxK`` at masked positions are ignored (they may hold any
finite or non-finite value; they never reach the loss or its gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAIR_MODES = ("random", "best_worst", "all")


def _prepare(logp_BxK, sim_BxK, mask_BxK, name: str):
  logp_BxK = jnp.asarray(logp_BxK)
  sim_BxK = jnp.asarray(sim_BxK)
  mask_BxK = jnp.asarray(mask_BxK)
  if logp_BxK.ndim != 2:
    raise ValueError(
      f"{name}: logp must be [B, K] (one row of candidate log-likelihoods per input), "
      f"got shape {logp_BxK.shape}; add a batch axis with logp[None] for a single input."
    )
  if sim_BxK.shape != logp_BxK.shape or mask_BxK.shape != logp_BxK.shape:
    raise ValueError(
      f"{name}: logp {logp_BxK.shape}, sim {sim_BxK.shape} and mask {mask_BxK.shape} must all "
      "have the same [B, K] shape; pad candidate sets to a common K and mark padding in mask."
    )
  valid_BxK = mask_BxK.astype(bool)
  # Masked entries may be -inf or nan; replace them so neither the value nor the gradient
  # (through jnp.where's unselected branch) can be polluted.
  logp_BxK = jnp.where(valid_BxK, logp_BxK, 0.0).astype(jnp.float32)
  sim_BxK = jnp.where(valid_BxK, sim_BxK, 0.0).astype(jnp.float32)
  return logp_BxK, sim_BxK, valid_BxK


def _check_beta(beta: float, name: str):
  if not beta >= 0:
    raise ValueError(f"{name}: beta must be >= 0 (the ranking margin), got {beta}.")


def _valid_pairs(sim_BxK, valid_BxK):
  """``[B, K, K]``: True where candidate i (row) should rank above candidate j (column)."""
  both = valid_BxK[:, :, None] & valid_BxK[:, None, :]
  return both & (sim_BxK[:, :, None] > sim_BxK[:, None, :])


def _take(x_BxK, i_B):
  return jnp.take_along_axis(x_BxK, i_B[:, None], axis=-1)[:, 0]


def _pairwise(logp_BxK, sim_BxK, valid_BxK, margin_fn, *, pairs: str, rng, name: str):
  """Shared body of the rank and margin losses; ``margin_fn(s_pos, s_neg)`` gives the margin."""
  if pairs not in PAIR_MODES:
    raise ValueError(f"{name}: pairs={pairs!r}; choose one of {PAIR_MODES}.")
  b, k = logp_BxK.shape
  if pairs == "all":
    pair_BxKxK = _valid_pairs(sim_BxK, valid_BxK)
    margin = margin_fn(sim_BxK[:, :, None], sim_BxK[:, None, :])
    hinge_BxKxK = jax.nn.relu(margin - logp_BxK[:, :, None] + logp_BxK[:, None, :])
    count_B = jnp.sum(pair_BxKxK, axis=(1, 2))
    total_B = jnp.sum(jnp.where(pair_BxKxK, hinge_BxKxK, 0.0), axis=(1, 2))
    return total_B / jnp.maximum(count_B, 1), count_B.astype(jnp.int32)
  if pairs == "random":
    if rng is None:
      raise ValueError(f"{name}: pairs='random' needs rng=jax.random.PRNGKey(...) (or a key).")
    pair_BxKxK = _valid_pairs(sim_BxK, valid_BxK)
    keys_BxKK = jax.random.uniform(rng, (b, k * k))
    flat_BxKK = pair_BxKxK.reshape(b, k * k)
    choice_B = jnp.argmax(jnp.where(flat_BxKK, keys_BxKK, -1.0), axis=-1)
    pos_B, neg_B = choice_B // k, choice_B % k
    has_B = jnp.any(flat_BxKK, axis=-1)
  else:  # best_worst
    pos_B = jnp.argmax(jnp.where(valid_BxK, sim_BxK, -jnp.inf), axis=-1)
    neg_B = jnp.argmin(jnp.where(valid_BxK, sim_BxK, jnp.inf), axis=-1)
    has_B = jnp.any(valid_BxK, axis=-1) & (_take(sim_BxK, pos_B) > _take(sim_BxK, neg_B))
  margin_B = margin_fn(_take(sim_BxK, pos_B), _take(sim_BxK, neg_B))
  hinge_B = jax.nn.relu(margin_B - _take(logp_BxK, pos_B) + _take(logp_BxK, neg_B))
  return jnp.where(has_B, hinge_B, 0.0), has_B.astype(jnp.int32)


def rank_loss(
  logp_BxK: jax.Array,
  sim_BxK: jax.Array,
  mask_BxK: jax.Array,
  *,
  beta: float = 1.0,
  pairs: str = "random",
  rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """SLiC rank (hinge) calibration loss.

  .. math::

    \\mathcal{L}_{rank} = \\max\\bigl(0,\\ \\beta - \\log P(\\hat y^+|x) + \\log P(\\hat y^-|x)\\bigr),
    \\qquad s(\\hat y^+) > s(\\hat y^-)

  Args:
    logp_BxK: sequence log-likelihoods ``log P(ŷ_k|x)`` of each candidate (summed over tokens).
    sim_BxK: similarity of each candidate to the target.
    mask_BxK: 1/True for real candidates, 0/False for padding.
    beta: the margin β (>= 0).
    pairs: which pair(s) per input. ``"random"``: one pair drawn uniformly among all pairs
      with ``s_i > s_j`` (needs ``rng``); ``"best_worst"``: highest- vs lowest-similarity valid
      candidate (first index on ties); ``"all"``: the mean of the hinge over every pair with
      ``s_i > s_j`` (a mean, so β and the regularizer weight keep the scale of one pair).
    rng: PRNG key, required for ``pairs="random"``.

  Returns:
    ``(loss_B, num_pairs_B)``; ``num_pairs_B`` counts the pairs used (``0`` means the input had
    no strictly ordered pair and its loss is ``0``).

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045).
  """
  _check_beta(beta, "rank_loss")
  logp_BxK, sim_BxK, valid_BxK = _prepare(logp_BxK, sim_BxK, mask_BxK, "rank_loss")
  return _pairwise(
    logp_BxK,
    sim_BxK,
    valid_BxK,
    lambda sp, sn: jnp.full_like(sp, beta),
    pairs=pairs,
    rng=rng,
    name="rank_loss",
  )


def margin_loss(
  logp_BxK: jax.Array,
  sim_BxK: jax.Array,
  mask_BxK: jax.Array,
  *,
  beta: float = 1.0,
  pairs: str = "random",
  rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """SLiC margin calibration loss: the rank loss with a similarity-scaled margin.

  .. math::

    \\mathcal{L}_{margin} = \\max\\bigl(0,\\ \\beta\\,(s(\\hat y^+) - s(\\hat y^-))
      - \\log P(\\hat y^+|x) + \\log P(\\hat y^-|x)\\bigr)

  The margin depends on the similarities only; no gradient flows into ``sim_BxK`` (it is data).
  Arguments, pair selection and returns as in :func:`rank_loss`.

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045).
  """
  _check_beta(beta, "margin_loss")
  logp_BxK, sim_BxK, valid_BxK = _prepare(logp_BxK, sim_BxK, mask_BxK, "margin_loss")
  sim_BxK = jax.lax.stop_gradient(sim_BxK)
  return _pairwise(
    logp_BxK,
    sim_BxK,
    valid_BxK,
    lambda sp, sn: beta * (sp - sn),
    pairs=pairs,
    rng=rng,
    name="margin_loss",
  )


def list_rank_loss(
  logp_BxK: jax.Array,
  sim_BxK: jax.Array,
  mask_BxK: jax.Array,
  *,
  beta: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """BRIO-style list-rank loss: every ordered pair, margin growing with the rank gap.

  .. math::

    \\mathcal{L}_{list} = \\sum_{i<j} \\max\\bigl(0,\\ \\beta\\,(j-i) - \\log P(\\hat y_i|x)
      + \\log P(\\hat y_j|x)\\bigr)

  with candidates indexed by their position in a stable sort of the **valid** candidates by
  similarity, descending (masked candidates take no position). Pairs whose similarities tie
  are skipped (no order to learn), but ties still occupy positions, so ``j - i`` is the gap in
  that sorted list. The sum (not a mean) follows BRIO.

  Returns:
    ``(loss_B, num_pairs_B)``; ``num_pairs_B`` is the number of summed pairs.

  References: Liu et al., "BRIO: Bringing Order to Abstractive Summarization", ACL 2022;
  Zhao et al., ICLR 2023 (arXiv 2210.00045), list-rank ablation.
  """
  _check_beta(beta, "list_rank_loss")
  logp_BxK, sim_BxK, valid_BxK = _prepare(logp_BxK, sim_BxK, mask_BxK, "list_rank_loss")
  sim_BxK = jax.lax.stop_gradient(sim_BxK)
  # Position of each candidate in the descending sort; invalid ones sort after all valid ones.
  order_BxK = jnp.argsort(jnp.where(valid_BxK, -sim_BxK, jnp.inf), axis=-1, stable=True)
  rank_BxK = jnp.argsort(order_BxK, axis=-1).astype(jnp.float32)
  pair_BxKxK = _valid_pairs(sim_BxK, valid_BxK)
  gap_BxKxK = rank_BxK[:, None, :] - rank_BxK[:, :, None]
  hinge = jax.nn.relu(beta * gap_BxKxK - logp_BxK[:, :, None] + logp_BxK[:, None, :])
  loss_B = jnp.sum(jnp.where(pair_BxKxK, hinge, 0.0), axis=(1, 2))
  return loss_B, jnp.sum(pair_BxKxK, axis=(1, 2)).astype(jnp.int32)


def expected_reward_loss(
  logp_BxK: jax.Array,
  sim_BxK: jax.Array,
  mask_BxK: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Expected-reward (minimum-risk) loss: negative similarity under the candidate softmax.

  .. math::

    \\mathcal{L}_{reward} = -\\sum_i s(\\hat y_i)
      \\frac{P(\\hat y_i|x)}{\\sum_j P(\\hat y_j|x)}
      = -\\sum_i s_i\\, \\mathrm{softmax}_i(\\log P(\\hat y|x))

  The softmax runs over valid candidates only. Inputs with no valid candidate get ``0``. When
  all valid candidates tie in similarity the loss is ``-s`` but its gradient is zero.

  Returns:
    ``(loss_B, num_pairs_B)``; ``num_pairs_B`` counts strictly ordered valid pairs (``0`` means
    the loss has no gradient for that input), so all four calibration losses report alike.

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045); Edunov et al. 2018 (expected risk).
  """
  logp_BxK, sim_BxK, valid_BxK = _prepare(logp_BxK, sim_BxK, mask_BxK, "expected_reward_loss")
  top_B = jnp.max(jnp.where(valid_BxK, logp_BxK, -jnp.inf), axis=-1)
  top_B = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top_B), top_B, 0.0))
  shifted_BxK = jnp.where(valid_BxK, logp_BxK - top_B[:, None], 0.0)
  w_BxK = jnp.where(valid_BxK, jnp.exp(shifted_BxK), 0.0)
  p_BxK = w_BxK / jnp.maximum(jnp.sum(w_BxK, axis=-1, keepdims=True), 1e-30)
  loss_B = -jnp.sum(p_BxK * sim_BxK, axis=-1)
  count_B = jnp.sum(_valid_pairs(sim_BxK, valid_BxK), axis=(1, 2)).astype(jnp.int32)
  return loss_B, count_B
