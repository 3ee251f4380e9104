"""Maximum-likelihood (token cross-entropy) loss with label smoothing and z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(
  logits_XxLxV: jax.Array, targets_XxL: jax.Array, *, label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy, unreduced.

  .. math::

    \\ell_t = -(1-\\epsilon) \\log p(y_t) - \\frac{\\epsilon}{V} \\sum_v \\log p(v)
      + \\lambda_z (\\log Z_t)^2

  Args:
    logits_XxLxV: logits ``[..., L, V]``.
    targets_XxL: target ids ``[..., L]``.
    label_smoothing: ε, mass spread uniformly over the vocabulary.
    z_loss: λ_z, weight of the squared log-partition (PaLM's z-loss; keeps logits bounded).

  Returns:
    ``(loss, nll)`` both ``[..., L]``: the full per-token loss and the plain negative
    log-likelihood (for reporting perplexity).

  References: Szegedy et al. 2016 (label smoothing); Chowdhery et al. 2022 (z-loss).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  if z_loss < 0:
    raise ValueError(f"z_loss must be >= 0, got {z_loss}.")
  if logits_XxLxV.shape[:-1] != targets_XxL.shape:
    raise ValueError(f"logits {logits_XxLxV.shape} do not match targets {targets_XxL.shape}.")
  logits = logits_XxLxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  logp = logits - log_z[..., None]
  nll = -jnp.take_along_axis(logp, targets_XxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = nll
  if label_smoothing > 0:
    loss = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  if z_loss > 0:
    loss = loss + z_loss * jnp.square(log_z)
  return loss, nll


def masked_mean(values_XxL: jax.Array, mask_XxL: jax.Array) -> jax.Array:
  """Mean over unmasked entries (0 when everything is masked)."""
  mask = mask_XxL.astype(jnp.float32)
  return jnp.sum(values_XxL * mask) / jnp.maximum(jnp.sum(mask), 1.0)
