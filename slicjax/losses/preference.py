"""Pairwise preference losses: DPO / RSO sigmoid-norm, hinge, hinge-norm, IPO and SLiC-HF.

Inputs are sequence log-likelihoods (summed over the completion's tokens) of the chosen
(``y_w``) and rejected (``y_l``) completions under the policy π_θ and, where the loss is
normalized, under the frozen reference π_ref (π_sft). Every argument has the same shape, usually
``[B]``; the loss is returned unreduced with that shape. Notation::

  Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x),   Δ_l likewise,   h = Δ_w − Δ_l.

The reference log-likelihoods are treated as data: gradients are stopped on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _arrays(name: str, **named):
  arrays = {k: jnp.asarray(v) for k, v in named.items()}
  shapes = {k: v.shape for k, v in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(
      f"{name}: all inputs must share one shape (usually [B]), got {shapes}; pass one value per "
      "preference pair in each argument."
    )
  return [v.astype(jnp.float32) for v in arrays.values()]


def _positive(name: str, **values):
  for k, v in values.items():
    if not v > 0:
      raise ValueError(f"{name}: {k} must be > 0, got {v}.")


def _log_ratio_margin(pol_w, pol_l, ref_w, ref_l):
  ref_w, ref_l = jax.lax.stop_gradient(ref_w), jax.lax.stop_gradient(ref_l)
  return (pol_w - ref_w) - (pol_l - ref_l)


def sigmoid_norm_loss(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  ref_chosen_logp_B: jax.Array,
  ref_rejected_logp_B: jax.Array,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """DPO loss (RSO's *sigmoid-norm*), optionally label-smoothed (conservative DPO).

  .. math::

    \\mathcal{L} = -(1-\\varepsilon)\\log\\sigma(\\beta h) - \\varepsilon\\log\\sigma(-\\beta h),
    \\qquad h = \\Delta_w - \\Delta_l

  Args:
    policy_chosen_logp_B: ``log π_θ(y_w|x)``.
    policy_rejected_logp_B: ``log π_θ(y_l|x)``.
    ref_chosen_logp_B: ``log π_ref(y_w|x)``.
    ref_rejected_logp_B: ``log π_ref(y_l|x)``.
    beta: β (DPO, default 0.1); RSO calls the same scale γ (default 0.05), which the
      preference pipeline passes here for its ``sigmoid_norm`` loss. Must be > 0.
    label_smoothing: ε in ``[0, 0.5)``, the assumed probability that a label is flipped.

  Returns:
    ``[B]`` loss.

  References: Rafailov et al., "Direct Preference Optimization", NeurIPS 2023; Liu et al.,
  "Statistical Rejection Sampling Improves Preference Optimization", ICLR 2024
  (arXiv 2309.06657); Mitchell 2023 (conservative DPO).
  """
  _positive("sigmoid_norm_loss", beta=beta)
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(
      f"sigmoid_norm_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}; "
      "0.5 would make the loss independent of the labels."
    )
  pw, pl, rw, rl = _arrays(
    "sigmoid_norm_loss",
    policy_chosen=policy_chosen_logp_B,
    policy_rejected=policy_rejected_logp_B,
    ref_chosen=ref_chosen_logp_B,
    ref_rejected=ref_rejected_logp_B,
  )
  z = beta * _log_ratio_margin(pw, pl, rw, rl)
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


dpo_loss = sigmoid_norm_loss


def hinge_loss(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  *,
  gamma: float = 0.05,
  delta: float = 1.0,
) -> jax.Array:
  """Reference-free hinge loss (RSO's *hinge*, SLiC's rank loss on preference pairs).

  .. math::

    \\mathcal{L} = \\max\\bigl(0,\\ \\delta - \\gamma\\,[\\log\\pi_\\theta(y_w|x)
      - \\log\\pi_\\theta(y_l|x)]\\bigr)

  Args:
    policy_chosen_logp_B: ``log π_θ(y_w|x)``.
    policy_rejected_logp_B: ``log π_θ(y_l|x)``.
    gamma: γ > 0, scale of the log-likelihood gap (RSO default 0.05).
    delta: δ >= 0, the margin (1.0 in RSO and SLiC-HF).

  Returns:
    ``[B]`` loss.

  References: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization",
  ICLR 2024 (arXiv 2309.06657); Zhao et al., "SLiC-HF", 2023 (arXiv 2305.10425).
  """
  _positive("hinge_loss", gamma=gamma)
  if not delta >= 0:
    raise ValueError(f"hinge_loss: delta (the margin) must be >= 0, got {delta}.")
  pw, pl = _arrays(
    "hinge_loss", policy_chosen=policy_chosen_logp_B, policy_rejected=policy_rejected_logp_B
  )
  return jax.nn.relu(delta - gamma * (pw - pl))


def hinge_norm_loss(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  ref_chosen_logp_B: jax.Array,
  ref_rejected_logp_B: jax.Array,
  *,
  gamma: float = 0.05,
  delta: float = 1.0,
) -> jax.Array:
  """Hinge loss on reference-normalized log-likelihoods (RSO's *hinge-norm*).

  .. math::

    \\mathcal{L} = \\max\\bigl(0,\\ \\delta - \\gamma\\,(\\Delta_w - \\Delta_l)\\bigr)

  Args as in :func:`sigmoid_norm_loss`, with ``gamma`` (γ > 0, RSO default 0.05) as the scale
  and ``delta`` (δ >= 0, default 1) as the margin.

  Returns:
    ``[B]`` loss.

  References: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization",
  ICLR 2024 (arXiv 2309.06657).
  """
  _positive("hinge_norm_loss", gamma=gamma)
  if not delta >= 0:
    raise ValueError(f"hinge_norm_loss: delta (the margin) must be >= 0, got {delta}.")
  pw, pl, rw, rl = _arrays(
    "hinge_norm_loss",
    policy_chosen=policy_chosen_logp_B,
    policy_rejected=policy_rejected_logp_B,
    ref_chosen=ref_chosen_logp_B,
    ref_rejected=ref_rejected_logp_B,
  )
  return jax.nn.relu(delta - gamma * _log_ratio_margin(pw, pl, rw, rl))


def ipo_loss(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  ref_chosen_logp_B: jax.Array,
  ref_rejected_logp_B: jax.Array,
  chosen_len_B: jax.Array,
  rejected_len_B: jax.Array,
  *,
  beta: float = 0.1,
  length_normalize: bool = True,
) -> jax.Array:
  """IPO loss, with per-token normalized log-ratios (default) or in the paper's sequence-level
  form (``length_normalize=False``).

  .. math::

    \\mathcal{L} = \\Bigl(\\frac{\\Delta_w}{|y_w|} - \\frac{\\Delta_l}{|y_l|}
      - \\frac{1}{2\\beta}\\Bigr)^2
    \\quad\\text{or}\\quad
    \\mathcal{L} = \\Bigl(\\Delta_w - \\Delta_l - \\frac{1}{2\\beta}\\Bigr)^2

  Args:
    policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B: as in
      :func:`sigmoid_norm_loss`.
    chosen_len_B: ``|y_w|``, number of completion tokens of the chosen output (> 0).
    rejected_len_B: ``|y_l|`` likewise.
    beta: β > 0; the regression target for the (normalized) margin is ``1/(2β)``.
    length_normalize: divide each log-ratio by its completion's token count (the common
      implementation); ``False`` is Azar et al.'s sequence-level form (lengths unused).

  Returns:
    ``[B]`` loss.

  References: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (IPO), AISTATS 2024.
  """
  _positive("ipo_loss", beta=beta)
  pw, pl, rw, rl, nw, nl = _arrays(
    "ipo_loss",
    policy_chosen=policy_chosen_logp_B,
    policy_rejected=policy_rejected_logp_B,
    ref_chosen=ref_chosen_logp_B,
    ref_rejected=ref_rejected_logp_B,
    chosen_len=chosen_len_B,
    rejected_len=rejected_len_B,
  )
  for name, n in (("chosen_len", nw), ("rejected_len", nl)):
    if not isinstance(n, jax.core.Tracer) and bool(jnp.any(n <= 0)):
      raise ValueError(
        f"ipo_loss: {name} must be > 0 (token count of each completion), got {n}; drop empty "
        "completions before building pairs."
      )
  rw, rl = jax.lax.stop_gradient(rw), jax.lax.stop_gradient(rl)
  if not length_normalize:
    return jnp.square((pw - rw) - (pl - rl) - 1.0 / (2.0 * beta))
  nw, nl = jnp.maximum(nw, 1.0), jnp.maximum(nl, 1.0)
  return jnp.square((pw - rw) / nw - (pl - rl) / nl - 1.0 / (2.0 * beta))


def slic_hf_loss(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  policy_target_logp_B: jax.Array,
  *,
  delta: float = 1.0,
  reg_weight: float = 1.0,
) -> jax.Array:
  """SLiC-HF: rank calibration on preference pairs plus cross-entropy on a target.

  .. math::

    \\mathcal{L} = \\max\\bigl(0,\\ \\delta - \\log\\pi_\\theta(y^+|x) + \\log\\pi_\\theta(y^-|x)\\bigr)
      - \\lambda \\log\\pi_\\theta(y_{ref}|x)

  No reference model is needed.

  Args:
    policy_chosen_logp_B: ``log π_θ(y+|x)``.
    policy_rejected_logp_B: ``log π_θ(y−|x)``.
    policy_target_logp_B: ``log π_θ(y_ref|x)`` of the regularization target (the SFT target or
      the best-ranked decode), summed over its tokens.
    delta: δ >= 0, the margin (paper: 1.0).
    reg_weight: λ >= 0, weight of the cross-entropy term. The paper tunes it; 1.0 here is a
      neutral default, not a published value.

  Returns:
    ``[B]`` loss.

  References: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
  2023 (arXiv 2305.10425).
  """
  if not delta >= 0:
    raise ValueError(f"slic_hf_loss: delta (the margin) must be >= 0, got {delta}.")
  if not reg_weight >= 0:
    raise ValueError(f"slic_hf_loss: reg_weight (λ) must be >= 0, got {reg_weight}.")
  pw, pl, pt = _arrays(
    "slic_hf_loss",
    policy_chosen=policy_chosen_logp_B,
    policy_rejected=policy_rejected_logp_B,
    policy_target=policy_target_logp_B,
  )
  return jax.nn.relu(delta - pw + pl) - reg_weight * pt


def preference_metrics(
  policy_chosen_logp_B: jax.Array,
  policy_rejected_logp_B: jax.Array,
  ref_chosen_logp_B: jax.Array,
  ref_rejected_logp_B: jax.Array,
  *,
  beta: float = 0.1,
) -> dict[str, jax.Array]:
  """Implicit-reward diagnostics of a preference policy, per example (unreduced).

  Returns:
    dict of ``[B]`` arrays: ``chosen_reward`` = β·Δ_w, ``rejected_reward`` = β·Δ_l,
    ``margin`` = β·(Δ_w − Δ_l), ``accuracy`` = 1.0 where the margin is > 0 else 0.0 (ties count
    as wrong, so an untrained policy equal to the reference scores 0).
  """
  _positive("preference_metrics", beta=beta)
  pw, pl, rw, rl = _arrays(
    "preference_metrics",
    policy_chosen=policy_chosen_logp_B,
    policy_rejected=policy_rejected_logp_B,
    ref_chosen=ref_chosen_logp_B,
    ref_rejected=ref_rejected_logp_B,
  )
  chosen, rejected = beta * (pw - rw), beta * (pl - rl)
  margin = chosen - rejected
  return {
    "chosen_reward": chosen,
    "rejected_reward": rejected,
    "margin": margin,
    "accuracy": (margin > 0).astype(jnp.float32),
  }
