"""The one scoring primitive: logits -> per-token log-probs -> per-sequence log-likelihoods.

Every loss in the library consumes the outputs of this module, never a model. Works on
``[B, L]`` targets and ``[B, K, L]`` candidate sets alike (any leading dims).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slicjax.models.seq_model import PAD_ID, SeqModel


def token_logprobs(logits_XxLxV: jax.Array, targets_XxL: jax.Array) -> jax.Array:
  """``log P(y_t | y_<t, x)`` for every position: ``[..., L]`` float32."""
  if logits_XxLxV.shape[:-1] != targets_XxL.shape:
    raise ValueError(
      f"logits shape {logits_XxLxV.shape} does not match targets shape {targets_XxL.shape}: "
      "logits must be [..., L, V] for targets [..., L]."
    )
  logp = jax.nn.log_softmax(logits_XxLxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_XxL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def target_mask(targets_XxL: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
  """1.0 on real target tokens (EOS included), 0.0 on padding."""
  return (targets_XxL != pad_id).astype(jnp.float32)


def sequence_logprob(
  token_logp_XxL: jax.Array, mask_XxL: jax.Array, *, normalize: bool = False
) -> jax.Array:
  """Sum (or mean, with ``normalize``) of token log-probs over unmasked positions: ``[...]``."""
  if token_logp_XxL.shape != mask_XxL.shape:
    raise ValueError(f"token_logp {token_logp_XxL.shape} and mask {mask_XxL.shape} differ.")
  mask = mask_XxL.astype(jnp.float32)
  total = jnp.sum(token_logp_XxL * mask, axis=-1)
  if normalize:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


def score_targets(
  model: SeqModel, params, batch, *, return_hidden=False, normalize=False, deterministic=True,
  rngs=None,
):
  """Scores ``batch['targets']`` given ``batch['inputs']``.

  Returns a dict with ``token_logp`` ``[B, L]``, ``mask`` ``[B, L]``, ``logp`` ``[B]``,
  ``logits`` ``[B, L, V]`` and, with ``return_hidden``, ``hidden`` ``[B, L, D]``.

  Diffusion models (which have ``sequence_logprob``) return ``logp`` as an ELBO estimate and
  ``token_logp``/``logits`` as ``None``; ``rngs['diffusion']`` keys the estimate (a fixed key
  when absent, so policy and reference scored alike share timesteps and masks).
  """
  if hasattr(model, "sequence_logprob"):
    return _elbo_scores(model, params, batch["inputs"], batch["targets"], rngs, return_hidden)
  logits, hidden = model.target_logits(
    params, batch, return_hidden=return_hidden, deterministic=deterministic, rngs=rngs
  )
  targets = batch["targets"]
  tok = token_logprobs(logits, targets)
  mask = target_mask(targets)
  if "targets_segment_ids" in batch:
    mask = mask * (batch["targets_segment_ids"] != 0)
  out = dict(token_logp=tok, mask=mask, logp=sequence_logprob(tok, mask, normalize=normalize),
             logits=logits)
  if return_hidden:
    out["hidden"] = hidden
  return out


def score_candidates(
  model: SeqModel, params, inputs_BxS, candidates_BxKxL, *, return_hidden=False,
  normalize=False, deterministic=True, rngs=None,
):
  """Scores K candidates per input (the encoder, if any, runs once per input).

  Returns a dict with ``token_logp`` ``[B, K, L]``, ``mask``, ``logp`` ``[B, K]``, ``logits``
  ``[B, K, L, V]`` and optionally ``hidden`` ``[B, K, L, D]``.
  """
  if candidates_BxKxL.ndim != 3 or inputs_BxS.shape[0] != candidates_BxKxL.shape[0]:
    raise ValueError(
      f"candidates must be [B, K, L] with B = inputs' batch {inputs_BxS.shape[0]}, got "
      f"{candidates_BxKxL.shape}."
    )
  if hasattr(model, "sequence_logprob"):
    b, k, length = candidates_BxKxL.shape
    out = _elbo_scores(model, params, jnp.repeat(inputs_BxS, k, axis=0),
                       candidates_BxKxL.reshape(b * k, length), rngs, return_hidden)
    return dict(out, logp=out["logp"].reshape(b, k), mask=out["mask"].reshape(b, k, length))
  logits, hidden = model.candidate_logits(
    params, inputs_BxS, candidates_BxKxL, return_hidden=return_hidden,
    deterministic=deterministic, rngs=rngs,
  )
  tok = token_logprobs(logits, candidates_BxKxL)
  mask = target_mask(candidates_BxKxL)
  out = dict(token_logp=tok, mask=mask, logp=sequence_logprob(tok, mask, normalize=normalize),
             logits=logits)
  if return_hidden:
    out["hidden"] = hidden
  return out


def _elbo_scores(model, params, inputs_BxS, targets_BxL, rngs, return_hidden):
  if return_hidden:
    raise ValueError("diffusion models expose no decoder states; use a 'rouge' or "
                     "'token_embedding' similarity instead of 'latent'.")
  rng = (rngs or {}).get("diffusion", jax.random.PRNGKey(0))
  logp = model.sequence_logprob(params, inputs_BxS, targets_BxL, rng)
  return dict(token_logp=None, mask=target_mask(targets_BxL), logp=logp, logits=None)
