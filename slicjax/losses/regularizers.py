"""Regularizers that keep a calibrated policy near the fine-tuned model θ_ft.

Two ways to get the fine-tuned model's token distributions along the target ȳ:

* **Path 1** (:func:`kl_regularizer`): keep the frozen fine-tuned params resident and evaluate
  them in the same training step. Exact, costs a second copy of the parameters (and its
  optimizer-free forward pass) on the accelerator.
* **Path 2** (:func:`kl_regularizer_topk`): when candidates are generated, store the
  fine-tuned model's top-``k`` log-probs per target position (:func:`topk_logprobs`). No second
  model at training time; costs ``2·k·L`` numbers per example (``k·L`` log-probs plus ``k·L``
  ids) on disk and in the batch. The reference distribution is approximated by renormalizing
  its mass over the stored top-``k`` tokens, so the KL ignores the reference tail; the error
  is small when the top-``k`` tokens hold nearly all the mass (check ``exp(logsumexp)`` of the
  stored values, which is the covered mass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_mask(name: str, lead_shape, mask_BxL):
  if tuple(lead_shape) != tuple(mask_BxL.shape):
    raise ValueError(
      f"{name}: mask shape {mask_BxL.shape} must equal the leading [B, L] shape {tuple(lead_shape)}"
      " of the other inputs; build the mask from the target ids (targets != pad_id)."
    )


def _kl_terms(logq, logp):
  """``Σ_v q (log q − log p)`` over the last axis with ``0 · log 0 = 0`` (finite gradients)."""
  support = logq > -jnp.inf
  q = jnp.where(support, jnp.exp(logq), 0.0)
  diff = jnp.where(support, logq - logp, 0.0)
  return jnp.sum(q * diff, axis=-1)


def cross_entropy_regularizer(token_logp_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Negative log-likelihood of the dataset target, summed over its tokens.

  .. math::

    \\mathcal{L}_{CE} = -\\log P_\\theta(\\bar y|x) = -\\sum_t m_t \\log P_\\theta(\\bar y_t|\\bar y_{<t},x)

  Args:
    token_logp_BxL: per-token log-probs of the target under the policy.
    mask_BxL: 1 on target tokens, 0 on padding.

  Returns:
    ``[B]`` loss.

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045).
  """
  token_logp_BxL, mask_BxL = jnp.asarray(token_logp_BxL), jnp.asarray(mask_BxL)
  _check_mask("cross_entropy_regularizer", token_logp_BxL.shape, mask_BxL)
  valid = mask_BxL.astype(bool)
  return -jnp.sum(jnp.where(valid, token_logp_BxL.astype(jnp.float32), 0.0), axis=-1)


def kl_regularizer(
  policy_logits_BxLxV: jax.Array,
  ref_logits_BxLxV: jax.Array,
  mask_BxL: jax.Array,
) -> jax.Array:
  """Token-level KL from the fine-tuned model to the policy along the target (path 1).

  .. math::

    \\mathcal{L}_{KL} = \\sum_t m_t\\, \\mathrm{KL}\\bigl(P_{ft}(\\cdot|\\bar y_{<t},x)\\,\\|\\,
      P_\\theta(\\cdot|\\bar y_{<t},x)\\bigr)
      = \\sum_t m_t \\sum_v P_{ft}(v)\\,[\\log P_{ft}(v) - \\log P_\\theta(v)]

  Args:
    policy_logits_BxLxV: policy logits at each target position (teacher-forced on ȳ).
    ref_logits_BxLxV: the frozen fine-tuned model's logits at the same positions; gradients
      are stopped on them.
    mask_BxL: 1 on target tokens, 0 on padding.

  Returns:
    ``[B]`` loss (>= 0).

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045).
  """
  policy_logits_BxLxV = jnp.asarray(policy_logits_BxLxV)
  ref_logits_BxLxV = jnp.asarray(ref_logits_BxLxV)
  if policy_logits_BxLxV.shape != ref_logits_BxLxV.shape:
    raise ValueError(
      f"kl_regularizer: policy logits {policy_logits_BxLxV.shape} and reference logits "
      f"{ref_logits_BxLxV.shape} must have the same [B, L, V] shape (same targets, same vocab)."
    )
  _check_mask("kl_regularizer", policy_logits_BxLxV.shape[:-1], jnp.asarray(mask_BxL))
  logq = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits_BxLxV).astype(jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(policy_logits_BxLxV.astype(jnp.float32), axis=-1)
  kl_BxL = _kl_terms(logq, logp)
  return jnp.sum(jnp.where(jnp.asarray(mask_BxL).astype(bool), kl_BxL, 0.0), axis=-1)


def topk_logprobs(logits_BxLxV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The ``k`` largest log-probs per position and their token ids (what path 2 stores).

  Args:
    logits_BxLxV: the fine-tuned model's logits along the target.
    k: how many tokens to keep per position, ``1 <= k <= V``.

  Returns:
    ``(topk_logp_BxLxk, topk_ids_BxLxk)``: full-vocabulary-normalized log-probs (so their
    ``logsumexp`` is the mass the top-``k`` covers), sorted descending, and ``int32`` ids.
  """
  logits_BxLxV = jnp.asarray(logits_BxLxV)
  v = logits_BxLxV.shape[-1]
  if not isinstance(k, int) or not 1 <= k <= v:
    raise ValueError(f"topk_logprobs: k must be an int in [1, V={v}], got {k!r}.")
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  values, ids = jax.lax.top_k(logp, k)
  return values, ids.astype(jnp.int32)


def kl_regularizer_topk(
  policy_logits_BxLxV: jax.Array,
  ref_topk_logp_BxLxk: jax.Array,
  ref_topk_ids_BxLxk: jax.Array,
  mask_BxL: jax.Array,
) -> jax.Array:
  """Token-level KL against stored top-``k`` reference log-probs (path 2).

  The reference distribution at each position is approximated by renormalizing its stored
  top-``k`` probabilities, :math:`\\tilde q_i = q_i / \\sum_{j \\le k} q_j`, and zero elsewhere:

  .. math::

    \\mathcal{L}_{KL}^{(k)} = \\sum_t m_t \\sum_{i=1}^{k} \\tilde q_{t,i}\\,
      [\\log \\tilde q_{t,i} - \\log P_\\theta(v_{t,i}|\\bar y_{<t},x)]

  with :math:`P_\\theta` the policy's full-vocabulary softmax. This is the exact KL from
  :math:`\\tilde q` to the policy; it equals :func:`kl_regularizer` when ``k = V``. Memory
  trade-off: ``k·L`` floats plus ``k·L`` ids per example instead of a resident second model.

  Args:
    policy_logits_BxLxV: policy logits at each target position.
    ref_topk_logp_BxLxk: stored reference log-probs (from :func:`topk_logprobs`, any
      normalization: they are renormalized here).
    ref_topk_ids_BxLxk: their token ids.
    mask_BxL: 1 on target tokens, 0 on padding (positions past the stored length are ignored).

  Returns:
    ``[B]`` loss (>= 0).

  References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
  Generation", ICLR 2023 (arXiv 2210.00045) (KL regularizer; the top-k storage is this
  library's approximation).
  """
  policy_logits_BxLxV = jnp.asarray(policy_logits_BxLxV)
  ref_topk_logp_BxLxk = jnp.asarray(ref_topk_logp_BxLxk)
  ref_topk_ids_BxLxk = jnp.asarray(ref_topk_ids_BxLxk)
  if ref_topk_logp_BxLxk.shape != ref_topk_ids_BxLxk.shape:
    raise ValueError(
      f"kl_regularizer_topk: top-k log-probs {ref_topk_logp_BxLxk.shape} and ids "
      f"{ref_topk_ids_BxLxk.shape} must have the same [B, L, k] shape."
    )
  if ref_topk_logp_BxLxk.shape[:-1] != policy_logits_BxLxV.shape[:-1]:
    raise ValueError(
      f"kl_regularizer_topk: stored top-k [B, L] = {ref_topk_logp_BxLxk.shape[:-1]} does not "
      f"match the policy logits' [B, L] = {policy_logits_BxLxV.shape[:-1]}; store the top-k "
      "with the same target length the calibration batches use."
    )
  _check_mask("kl_regularizer_topk", policy_logits_BxLxV.shape[:-1], jnp.asarray(mask_BxL))
  ref = jax.lax.stop_gradient(ref_topk_logp_BxLxk).astype(jnp.float32)
  logq = jax.nn.log_softmax(ref, axis=-1)  # renormalize over the stored top-k
  logp = jax.nn.log_softmax(policy_logits_BxLxV.astype(jnp.float32), axis=-1)
  ids = jnp.clip(ref_topk_ids_BxLxk.astype(jnp.int32), 0, policy_logits_BxLxV.shape[-1] - 1)
  logp_at = jnp.take_along_axis(logp, ids, axis=-1)
  kl_BxL = _kl_terms(logq, logp_at)
  return jnp.sum(jnp.where(jnp.asarray(mask_BxL).astype(bool), kl_BxL, 0.0), axis=-1)
