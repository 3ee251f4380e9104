"""SLiC step 3: continue training from the fine-tuned model on L_cal + λ · L_reg.

The calibration loss (rank, margin, list_rank, expected_reward) compares the policy's sequence
log-likelihoods of each example's candidates with their similarity to the target; the
regularizer keeps the policy near the fine-tuned model: ``ce`` (target cross-entropy), ``kl``
(token-level KL to the frozen fine-tuned params evaluated in the same step: a second resident
copy of the params, exact), ``kl_topk`` (KL against the top-k log-probs stored with the
candidates: no second model, k·L floats per example, reference mass renormalized over its top
k) or ``none``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from slicjax import optim, scoring, training
from slicjax.data import iterators
from slicjax.losses import calibration, regularizers
from slicjax.pipelines import candidates as cand_lib
from slicjax.pipelines import common, tasks, validation

CALIBRATE_KEYS = dict(
  candidates_dir="", finetuned_workdir="", loss="rank", beta=1.0, pairs="random",
  regularizer="kl", reg_weight=1.0, steps=500, batch_size=16, log_every=25,
  checkpoint_every=250, keep_checkpoints=2, seed=0, progress=True,
  allow_partial_candidates=False,
)
LOSSES = ("rank", "margin", "list_rank", "expected_reward")
REGULARIZERS = ("ce", "kl", "kl_topk", "none")


def calibrate_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("calibrate"))
  common.check_keys(c, CALIBRATE_KEYS, "calibrate")
  c = {**CALIBRATE_KEYS, **c}
  if c["loss"] not in LOSSES:
    raise ValueError(f"calibrate.loss={c['loss']!r}; choose from {LOSSES}.")
  if c["regularizer"] not in REGULARIZERS:
    raise ValueError(f"calibrate.regularizer={c['regularizer']!r}; choose from {REGULARIZERS}.")
  for k in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    validation.count(c[k], f"calibrate.{k}")
  validation.finite(c["beta"], "calibrate.beta",
                    what="it is the rank/margin scale of the calibration loss")
  validation.finite(c["reg_weight"], "calibrate.reg_weight", low_inclusive=True)
  return c


def calibration_loss(name: str, logp_BxK, sim_BxK, mask_BxK, *, beta: float, pairs: str, rng):
  """``([B] loss, [B] number of valid pairs)`` by name (see ``slicjax.losses.calibration``)."""
  if name == "rank":
    return calibration.rank_loss(logp_BxK, sim_BxK, mask_BxK, beta=beta, pairs=pairs, rng=rng)
  if name == "margin":
    return calibration.margin_loss(logp_BxK, sim_BxK, mask_BxK, beta=beta, pairs=pairs, rng=rng)
  if name == "list_rank":
    return calibration.list_rank_loss(logp_BxK, sim_BxK, mask_BxK, beta=beta)
  if name == "expected_reward":
    return calibration.expected_reward_loss(logp_BxK, sim_BxK, mask_BxK)
  raise ValueError(f"unknown calibration loss {name!r}; choose from {LOSSES}.")


def slic_loss_fn(model, c: dict[str, Any]):
  """``loss_fn(params, batch, rng, state)`` for :func:`slicjax.training.make_train_step`."""

  def loss_fn(params, batch, rng, state):
    rngs = {"diffusion": rng}  # keys the ELBO estimate of diffusion models; unused otherwise
    cand = scoring.score_candidates(model, params, batch["inputs"], batch["candidates"],
                                    rngs=rngs)
    cal, num_pairs = calibration_loss(
      c["loss"], cand["logp"], batch["sim"], batch["cand_mask"], beta=c["beta"],
      pairs=c["pairs"], rng=rng,
    )
    # Examples whose candidates all tie in similarity contribute no pair (and no gradient).
    metrics = {"cal_loss": jnp.mean(cal), "pairs_per_example": jnp.mean(num_pairs)}
    reg = jnp.zeros_like(cal)
    if c["regularizer"] != "none":
      target = {"inputs": batch["inputs"], "targets": batch["targets"]}
      pol = scoring.score_targets(model, params, target, rngs=rngs)
      if c["regularizer"] == "ce" and pol["token_logp"] is None:  # diffusion: -ELBO
        reg = -pol["logp"]
      elif c["regularizer"] == "ce":
        reg = regularizers.cross_entropy_regularizer(pol["token_logp"], pol["mask"])
      elif c["regularizer"] == "kl":
        ref_logits = jax.lax.stop_gradient(
          scoring.score_targets(model, state.ref_params, target)["logits"]
        )
        reg = regularizers.kl_regularizer(pol["logits"], ref_logits, pol["mask"])
      else:
        reg = regularizers.kl_regularizer_topk(
          pol["logits"], batch["ref_topk_logp"], batch["ref_topk_ids"], pol["mask"]
        )
      metrics["reg_loss"] = jnp.mean(reg)
      metrics["target_nll_per_token"] = -jnp.sum(pol["logp"]) / jnp.maximum(
        jnp.sum(pol["mask"]), 1.0)
    loss = jnp.mean(cal) + c["reg_weight"] * jnp.mean(reg)
    metrics["mean_cand_logp"] = jnp.sum(cand["logp"] * batch["cand_mask"]) / jnp.maximum(
      jnp.sum(batch["cand_mask"]), 1.0)
    return loss, metrics

  return loss_fn


def run(config, workdir: str, *, params=None, data=None, on_log=None):
  """Calibrates the fine-tuned model on a candidate set. Returns ``(state, model)``."""
  c = calibrate_config(config)
  validation.optimizer(config)
  validation.candidates_dir(c["candidates_dir"], "calibrate.candidates_dir")
  if params is None:
    validation.run_dir(c["finetuned_workdir"], "calibrate.finetuned_workdir")
    validation.model_matches_run(config, c["finetuned_workdir"], "calibrate.finetuned_workdir")
  workdir = common.prepare_workdir(workdir, config)
  common.log_devices()
  model = common.model_from(config)
  if getattr(model, "family", None) == "diffusion" and c["regularizer"] in ("kl", "kl_topk"):
    raise ValueError(
      f"calibrate.regularizer={c['regularizer']!r} needs per-token logits, which a diffusion "
      "model does not have; use regularizer=ce (its negative ELBO) or none."
    )
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if params is None:
    params = common.params_from(config, c["finetuned_workdir"], "calibrate.finetuned_workdir")
  model, params = common.maybe_lora(config, model, params, c["seed"])
  rows = cand_lib.read_candidates(c["candidates_dir"])
  cand_lib.check_complete(c["candidates_dir"], rows, allow_partial=c["allow_partial_candidates"])
  arrays = cand_lib.to_arrays(rows, data.input_len, data.target_len)
  if c["regularizer"] == "kl_topk" and "ref_topk_logp" not in arrays:
    raise ValueError("regularizer=kl_topk needs candidates generated with store_ref_topk > 0.")
  arrays.pop("cand_logp")
  mesh = common.make_mesh(config)
  per_process = c["batch_size"] // jax.process_count()
  it = iterators.ArrayDictIterator(arrays, per_process, seed=c["seed"],
                                   shard_index=jax.process_index(),
                                   shard_count=jax.process_count())
  tx, schedule = optim.make_optimizer(common.to_dict(config.get("optimizer")), c["steps"])
  ref = params if c["regularizer"] == "kl" else None
  state, state_sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(c["seed"]), params=params, ref_params=ref,
    init_kwargs=dict(input_len=data.input_len, target_len=data.target_len),
  )
  step = training.make_train_step(slic_loss_fn(model, c), tx, mesh, state_sh, schedule)
  state = training.train(
    state=state, state_shardings=state_sh, train_step=step, train_iter=it, mesh=mesh,
    workdir=workdir, on_log=on_log,
    loop=training.LoopConfig(
      steps=c["steps"], log_every=c["log_every"], checkpoint_every=c["checkpoint_every"],
      keep_checkpoints=c["keep_checkpoints"], progress=c["progress"],
    ),
  )
  return state, model
