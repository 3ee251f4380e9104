"""Adapting an autoregressive checkpoint into a masked-diffusion LM (AR-to-diffusion).

:func:`run` is :func:`slicjax.pipelines.mle.run` for ``config.model.family == "diffusion"``
started from the parameters of a trained decoder-only ``TransformerLM`` of the same
architecture instead of a random init:

* the parameters are converted by :func:`slicjax.models.diffusion.params_from_autoregressive`
  (the token embedding gains the [MASK] row; an untied head a zero column);
* the diffusion model should keep the AR "shift" (``model.shift = True``: slot j's logits read
  at position j - 1, where the AR model predicted token j) and, so that step 0 computes exactly
  the AR model's function on visible tokens, ``model.causal_prompt = True``;
* over the first ``anneal_steps`` steps the attention mask is annealed from causal to the
  model's final mask (block-causal with ``block_length``, else bidirectional): each pair the
  final mask allows beyond the causal one is open with probability p = step / anneal_steps
  (:func:`slicjax.models.diffusion.anneal_mask`), then training continues on the −ELBO with
  the final mask.

Reference: Gong et al., "Scaling Diffusion Language Models via Adaptation from Autoregressive
Models" (DiffuLLaMA, 2025): attention-mask annealing and shift operation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from slicjax import scoring
from slicjax.models import diffusion
from slicjax.pipelines import common, mle


def annealed_loss_fn(model, anneal_steps: int):
  """The −ELBO per target token with attention-mask annealing over ``anneal_steps`` steps."""
  if anneal_steps < 0:
    raise ValueError(f"anneal_steps must be >= 0 (0 = the final mask from the start), got "
                     f"{anneal_steps}.")

  def loss_fn(params, batch, rng, state):
    p = None
    if anneal_steps:
      p = jnp.clip(state.step.astype(jnp.float32) / anneal_steps, 0.0, 1.0)
    per_example = model.mle_loss(params, batch, rng, anneal_p=p)
    tokens = jnp.sum(scoring.target_mask(batch["targets"]))
    loss = jnp.sum(per_example) / jnp.maximum(tokens, 1.0)
    return loss, {"nll": loss, "tokens": tokens, "anneal_p": 1.0 if p is None else p}

  return loss_fn


def _check_shapes(converted, abstract):
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
  if set(got) != {k for k, _ in want}:
    raise ValueError(
      "the autoregressive parameters do not have the diffusion model's structure; build both "
      "from the same transformer config (family transformer vs diffusion, same sizes)."
    )
  for k, a in want:
    if got[k].shape != a.shape:
      raise ValueError(
        f"parameter {jax.tree_util.keystr(k)}: autoregressive {got[k].shape} (with the [MASK] "
        f"row added) vs diffusion {a.shape}; use the same model config for both."
      )


def run(config, workdir: str, ar_params, *, anneal_steps: int, mask_row: str = "mean",
        on_log=None):
  """Trains ``config.model`` (a diffusion model) from ``ar_params`` with the MLE loop
  (:func:`slicjax.pipelines.mle.run`, no periodic validation); returns ``(state, model, data)``
  like it."""
  model = common.model_from(config)
  if model.family != "diffusion":
    raise ValueError(f"AR-to-diffusion adaptation needs model.family='diffusion', got "
                     f"{model.family!r}.")
  if getattr(model.module.cfg, "position", "rope") == "relative":
    raise ValueError("AR-to-diffusion adaptation does not support relative position biases (a "
                     "causal model's buckets are one-sided); use rope, learned or none.")
  params = diffusion.params_from_autoregressive(ar_params, mask_row=mask_row)
  abstract = jax.eval_shape(lambda r: nn.unbox(model.init_fn()(r))["params"],
                            jax.random.PRNGKey(0))
  _check_shapes(params, abstract)
  config = ml_collections.ConfigDict(common.to_dict(config))
  config.train = {**common.to_dict(config.get("train")), "eval_every": 0}
  return mle.run(config, workdir, on_log=on_log, init_params=params,
                 loss_fn=annealed_loss_fn(model, anneal_steps))
