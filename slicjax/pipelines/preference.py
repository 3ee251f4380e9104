"""Preference optimization job: train the SFT policy on preference pairs.

:func:`train_preference` trains ``config.preference.loss`` — ``sigmoid_norm`` (= ``dpo``, with
label smoothing), ``hinge``, ``hinge_norm``, ``ipo`` or ``slic_hf`` (``slicjax.losses.
preference``) — starting from the SFT policy, on one pair source:

* ``direct`` — given pairs (``preference.pairs``: a pair directory or a text ``.jsonl``);
* ``sft-sample-rank`` — SFT samples ranked by the reward model, no rejection sampling;
* ``rso-sample-rank`` — RSO: rejection-sampled SFT samples, then ranked.

For the two sample-rank sources ``preference.pairs`` is a pair directory; when it holds no
chunks yet, :func:`slicjax.pipelines.rso.rso_sample` writes it first (``config.rso``, with
``mode`` set from the source). Reference log-probs are read from the pairs (computed once with
the SFT parameters when a source lacks them), so no second model is resident;
``preference.ref_logp="on_the_fly"`` instead keeps the frozen SFT parameters in
``TrainState.ref_params`` and scores the reference in every step. Every step logs the loss, the
implicit rewards ``s·Δ_w``, ``s·Δ_l`` (``s`` = β for sigmoid-norm/IPO, γ for the hinges, 1 for
SLiC-HF), their margin and pair accuracy, and the policy-only accuracy ``log π(y_w) >
log π(y_l)``. SLiC-HF's cross-entropy target ``y_ref`` is the prompt's dataset target (the
chosen completion for text pairs, which carry none).

:func:`slicjax.pipelines.gold_experiment.synthetic_gold_experiment` (which imports this) compares the
pair sources and losses under a synthetic gold reward and writes a markdown table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from slicjax import optim, scoring, training
from slicjax.data import iterators
from slicjax.losses import preference as pref_losses
from slicjax.pipelines import common, preference_pairs, rso, tasks, validation
from slicjax.train_state import TrainState

PREFERENCE_KEYS = dict(
  loss="sigmoid_norm",
  beta=0.1,
  gamma=0.05,
  delta=1.0,
  label_smoothing=0.0,
  reg_weight=1.0,
  slic_hf_target="target",
  pair_source="direct",
  pairs="",
  sft_workdir="",
  ref_logp="stored",
  steps=200,
  batch_size=16,
  log_every=1,
  checkpoint_every=1000,
  keep_checkpoints=2,
  seed=0,
  progress=True,
)
LOSSES = ("sigmoid_norm", "dpo", "hinge", "hinge_norm", "ipo", "ipo_seq", "slic_hf")
SLIC_HF_TARGETS = ("target", "best_ranked")
SOURCES = ("direct", "sft-sample-rank", "rso-sample-rank")
REF_LOGP = ("stored", "on_the_fly")


def preference_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("preference"))
  common.check_keys(c, PREFERENCE_KEYS, "preference")
  c = {**PREFERENCE_KEYS, **c}
  if c["loss"] not in LOSSES:
    raise ValueError(f"preference.loss={c['loss']!r}; choose from {LOSSES}.")
  if c["pair_source"] not in SOURCES:
    raise ValueError(f"preference.pair_source={c['pair_source']!r}; choose from {SOURCES}.")
  if c["slic_hf_target"] not in SLIC_HF_TARGETS:
    raise ValueError(
      f"preference.slic_hf_target={c['slic_hf_target']!r}; choose 'target' (the SFT target) "
      "or 'best_ranked' (the prompt's highest-reward sample, from an rso_sample pair directory)."
    )
  if c["ref_logp"] not in REF_LOGP:
    raise ValueError(f"preference.ref_logp={c['ref_logp']!r}; choose from {REF_LOGP}.")
  for k in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    validation.count(c[k], f"preference.{k}")
  validation.finite(c["beta"], "preference.beta",
                    what="beta scales the policy/reference log-ratio; 0 makes every loss constant")
  validation.finite(c["gamma"], "preference.gamma",
                    what="gamma scales the log-ratio margin of sigmoid_norm, hinge and hinge_norm")
  validation.finite(c["reg_weight"], "preference.reg_weight", low_inclusive=True)
  validation.finite(c["label_smoothing"], "preference.label_smoothing", low_inclusive=True,
                    high=0.5)
  return c


def reward_scale(c: dict[str, Any]) -> float:
  """The scale ``s`` of the logged implicit rewards ``s · (log π − log π_ref)``: RSO's γ for its
  losses (sigmoid_norm, hinge, hinge_norm), β for DPO and IPO."""
  if c["loss"] in ("dpo", "ipo", "ipo_seq"):
    return float(c["beta"])
  if c["loss"] in ("sigmoid_norm", "hinge", "hinge_norm"):
    return float(c["gamma"])
  return 1.0


def pair_loss(c: dict[str, Any], pw, pl, rw, rl, nw, nl, pt=None) -> jax.Array:
  """``[B]`` loss ``c["loss"]`` from policy (``pw``, ``pl``) and reference (``rw``, ``rl``)
  sequence log-probs, completion lengths (``nw``, ``nl``) and the target log-prob ``pt``."""
  name = c["loss"]
  if name in ("sigmoid_norm", "dpo"):  # one loss; RSO's recipe scales it by γ, DPO's by β
    return pref_losses.sigmoid_norm_loss(
      pw, pl, rw, rl, beta=reward_scale(c), label_smoothing=c["label_smoothing"]
    )
  if name == "hinge":
    return pref_losses.hinge_loss(pw, pl, gamma=c["gamma"], delta=c["delta"])
  if name == "hinge_norm":
    return pref_losses.hinge_norm_loss(pw, pl, rw, rl, gamma=c["gamma"], delta=c["delta"])
  if name in ("ipo", "ipo_seq"):
    return pref_losses.ipo_loss(pw, pl, rw, rl, nw, nl, beta=c["beta"],
                                length_normalize=name == "ipo")
  if name == "slic_hf":
    return pref_losses.slic_hf_loss(pw, pl, pt, delta=c["delta"], reg_weight=c["reg_weight"])
  raise ValueError(f"unknown preference loss {name!r}; choose from {LOSSES}.")


def preference_loss_fn(model, c: dict[str, Any]):
  """``loss_fn(params, batch, rng, state)`` for :func:`slicjax.training.make_train_step`.

  ``batch``: ``inputs [B, S]``, ``chosen``, ``rejected``, ``target [B, L]`` and, with stored
  reference log-probs, ``ref_chosen_logp``, ``ref_rejected_logp [B]``.
  """
  on_the_fly = c["ref_logp"] == "on_the_fly"
  with_target = c["loss"] == "slic_hf"
  scale = reward_scale(c)

  def loss_fn(params, batch, rng, state):
    cands = [batch["chosen"], batch["rejected"]] + ([batch["target"]] if with_target else [])
    cands_BxKxL = jnp.stack(cands, axis=1)
    # Diffusion models score by a Monte Carlo ELBO keyed by "diffusion": a fresh key every step,
    # and the same key (same masks and times) for the on-the-fly reference, so the
    # policy-minus-reference difference has low variance. Other families ignore it.
    k_drop, k_elbo = jax.random.split(rng)
    pol = scoring.score_candidates(
      model, params, batch["inputs"], cands_BxKxL, deterministic=False,
      rngs={"dropout": k_drop, "diffusion": k_elbo},
    )
    pw, pl = pol["logp"][:, 0], pol["logp"][:, 1]
    if on_the_fly:
      ref = scoring.score_candidates(
        model, state.ref_params, batch["inputs"], cands_BxKxL, rngs={"diffusion": k_elbo}
      )["logp"]
      rw, rl = jax.lax.stop_gradient(ref[:, 0]), jax.lax.stop_gradient(ref[:, 1])
    else:
      rw, rl = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    lengths = jnp.sum(pol["mask"], axis=-1)
    loss_B = pair_loss(
      c, pw, pl, rw, rl, lengths[:, 0], lengths[:, 1], pol["logp"][:, 2] if with_target else None
    )
    m = pref_losses.preference_metrics(pw, pl, rw, rl, beta=scale)
    metrics = {k: jnp.mean(v) for k, v in m.items()}
    metrics["policy_accuracy"] = jnp.mean((pw > pl).astype(jnp.float32))
    metrics["chosen_logp"], metrics["rejected_logp"] = jnp.mean(pw), jnp.mean(pl)
    return jnp.mean(loss_B), metrics

  return loss_fn


# --------------------------------------------------------------------------------------------
# Reference log-probs and evaluation on pairs


def _pair_logps(model, params, arrays, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``log π(y_w|x)``, ``log π(y_l|x)`` of every pair, in fixed-size batches."""
  n = len(arrays["inputs"])
  w, lose = [], []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, lo + batch_size) % n
    cands = np.stack([arrays["chosen"][idx], arrays["rejected"][idx]], axis=1)
    lp = rso.sequence_logps(model, params, arrays["inputs"][idx], cands)
    k = min(batch_size, n - lo)
    w.append(lp[:k, 0])
    lose.append(lp[:k, 1])
  return np.concatenate(w), np.concatenate(lose)


def fill_ref_logps(model, sft_params, arrays, batch_size: int) -> dict[str, np.ndarray]:
  """Adds ``ref_chosen_logp`` / ``ref_rejected_logp`` computed once with the SFT params."""
  if "ref_chosen_logp" in arrays:
    return arrays
  logging.info(
    "computing reference log-probs of %d pairs once with the SFT parameters", len(arrays["inputs"])
  )
  w, lose = _pair_logps(model, sft_params, arrays, batch_size)
  return dict(
    arrays, ref_chosen_logp=w.astype(np.float32), ref_rejected_logp=lose.astype(np.float32)
  )


TIE_TOLERANCE = 1e-4


def pair_report(model, params, arrays, c: dict[str, Any], batch_size: int) -> dict[str, float]:
  """Mean DPO loss (at ``c["beta"]``), implicit-reward accuracy and policy-only accuracy of
  ``params`` on the pairs (reference log-probs from ``arrays``).

  A pair counts as correct when its margin exceeds :data:`TIE_TOLERANCE` nats: the stored
  reference log-probs were computed in other batch shapes, so at ``params`` = SFT the margins
  are float noise around 0, which must read as ties (accuracy 0), not as coin flips.
  """
  pw, pl = _pair_logps(model, params, arrays, batch_size)
  rw, rl = arrays["ref_chosen_logp"], arrays["ref_rejected_logp"]
  h = (pw - rw) - (pl - rl)
  dpo = np.asarray(pref_losses.sigmoid_norm_loss(pw, pl, rw, rl, beta=c["beta"]))
  return dict(
    dpo_loss=float(np.mean(dpo)),
    accuracy=float(np.mean(h > TIE_TOLERANCE)),
    policy_accuracy=float(np.mean(pw - pl > TIE_TOLERANCE)),
    mean_margin=float(np.mean(h)),
  )


# --------------------------------------------------------------------------------------------
# The job


def slic_hf_targets(pairs, c):
  """Pairs whose ``target`` is SLiC-HF's ``y_ref``: the SFT target (as stored), or with
  ``slic_hf_target=best_ranked`` the prompt's highest-reward sample (``best``, written by
  ``rso_sample``). Other losses ignore the target.

  Raises:
    ValueError: ``best_ranked`` but a pair has no best sample (text pairs, older pair dirs).
  """
  if c["loss"] != "slic_hf" or c["slic_hf_target"] == "target":
    return pairs
  missing = [p["index"] for p in pairs if not p.get("best")]
  if missing:
    raise ValueError(
      f"preference.slic_hf_target=best_ranked needs each prompt's best-ranked sample, but "
      f"{len(missing)} pair(s) have none (first: prompt {missing[0]}); text pairs and pair "
      "directories from before this option carry none: rerun rso_sample, or use "
      "slic_hf_target=target."
    )
  return [dict(p, target=p["best"]) for p in pairs]


def load_pairs(config, c, *, model, params, data, pairs=None):
  """The pairs of ``c["pair_source"]``, sampling them first for an empty sample-rank dir."""
  if pairs is not None:
    return pairs
  if not c["pairs"]:
    raise ValueError(
      "preference.pairs is empty: give a pair directory (or a text .jsonl for pair_source=direct)."
    )
  if c["pair_source"] != "direct" and not preference_pairs.has_chunks(c["pairs"]):
    if os.path.isfile(c["pairs"]):
      raise ValueError(
        f"pair_source={c['pair_source']} reads a pair directory, not the file "
        f"{c['pairs']}; use pair_source=direct for given pairs."
      )
    cfg = ml_collections.ConfigDict(common.to_dict(config))
    rso_section = dict(common.to_dict(config.get("rso")))
    rso_section["mode"] = "rso" if c["pair_source"] == "rso-sample-rank" else "sft"
    cfg.rso = rso_section
    rso.rso_sample(cfg, c["pairs"], params=params, model=model, data=data)
  pairs = preference_pairs.read_pairs(c["pairs"], data)
  sources = {p["source"] for p in pairs if p.get("source")}
  if sources and sources != {c["pair_source"]}:
    raise ValueError(
      f"{c['pairs']} holds {sorted(sources)} pairs but preference.pair_source="
      f"{c['pair_source']!r}; set pair_source to match or point to other pairs."
    )
  return pairs


_STATE_CACHE: dict[Any, Any] = {}
_STEP_CACHE: dict[Any, Any] = {}


def _state_and_step(model, c, config, mesh, params, data):
  """Train state and compiled step. Runs with the same model, optimizer and mesh share the
  state layout, and with the same loss too the compiled step (the synthetic-gold experiment and
  sweeps train several policies in one process)."""
  opt_cfg = common.to_dict(config.get("optimizer"))
  ref = params if c["ref_logp"] == "on_the_fly" else None
  state_key = (
    model,
    json.dumps(opt_cfg, sort_keys=True, default=str),
    c["steps"],
    mesh.axis_names,
    tuple(d.id for d in mesh.devices.flat),
    data.input_len,
    data.target_len,
    ref is None,
  )
  loss_keys = ("loss", "beta", "gamma", "delta", "label_smoothing", "reg_weight", "ref_logp")
  step_key = state_key + tuple(c[k] for k in loss_keys)
  rng = jax.random.PRNGKey(c["seed"])
  if state_key in _STATE_CACHE:
    tx, schedule, state_sh = _STATE_CACHE[state_key]
    # Own copies: the step donates the state's buffers, never the caller's params.
    own = jax.tree.map(jnp.copy, params)
    state = jax.device_put(
      TrainState.create(
        own, tx, rng, ref_params=None if ref is None else jax.tree.map(jnp.copy, params)
      ),
      state_sh,
    )
  else:
    tx, schedule = optim.make_optimizer(opt_cfg, c["steps"])
    state, state_sh = training.create_train_state(
      model,
      tx,
      mesh,
      rng,
      params=params,
      ref_params=ref,
      init_kwargs=dict(input_len=data.input_len, target_len=data.target_len),
    )
    _STATE_CACHE[state_key] = (tx, schedule, state_sh)
  if step_key not in _STEP_CACHE:
    _STEP_CACHE[step_key] = training.make_train_step(
      preference_loss_fn(model, c), tx, mesh, state_sh, schedule
    )
  return state, state_sh, _STEP_CACHE[step_key]


def train_preference(
  config, workdir: str, *, params=None, model=None, data=None, pairs=None, on_log=None
):
  """Trains the SFT policy on preference pairs with ``config.preference.loss``.

  Args:
    config: job config (``model``, ``data``, ``optimizer``, ``preference`` and, for the
      sample-rank sources, ``rso``).
    workdir: checkpoints, ``metrics.jsonl`` and ``preference_summary.json`` go here.
    params, model, data: the SFT policy and task instead of ``preference.sft_workdir``.
    pairs: flat pair dicts instead of reading ``preference.pairs``.
    on_log: callback ``(step, metrics)`` at every logged step.

  Returns:
    ``(state, summary)``: the final train state and the dict of ``preference_summary.json``
    (DPO loss, implicit-reward and policy accuracy on the training pairs before and after).
  """
  c = preference_config(config)
  validation.optimizer(config)
  if params is None:
    validation.run_dir(c["sft_workdir"], "preference.sft_workdir")
    if model is None:
      validation.model_matches_run(config, c["sft_workdir"], "preference.sft_workdir")
  if pairs is None and c["pair_source"] == "direct":
    validation.file_or_dir(c["pairs"], "preference.pairs",
                           "give a pair directory (rso_sample output) or a text pairs .jsonl")
  workdir = common.prepare_workdir(workdir, config)
  common.log_devices()
  model = model or common.model_from(config)
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if params is None:
    params = common.params_from(config, c["sft_workdir"], "preference.sft_workdir")
  if model.family == "diffusion" and c["ref_logp"] == "stored":
    logging.warning(
      "diffusion policy with stored reference log-probs: the stored ELBO estimates used other "
      "masks than each step's policy estimate, so their difference is noisier; "
      "preference.ref_logp='on_the_fly' shares the masks (at the cost of a resident reference)."
    )
  pairs = slic_hf_targets(load_pairs(config, c, model=model, params=params, data=data,
                                     pairs=pairs), c)
  arrays = preference_pairs.pairs_to_arrays(pairs, data.input_len, data.target_len)
  arrays = fill_ref_logps(model, params, arrays, c["batch_size"])
  before = pair_report(model, params, arrays, c, c["batch_size"])
  mesh = common.make_mesh(config)
  model, params = common.maybe_lora(config, model, params, c["seed"])
  state, state_sh, step = _state_and_step(model, c, config, mesh, params, data)
  keys = ["inputs", "chosen", "rejected", "target"]
  if c["ref_logp"] == "stored":
    keys += ["ref_chosen_logp", "ref_rejected_logp"]
  it = iterators.ArrayDictIterator(
    {k: arrays[k] for k in keys},
    c["batch_size"] // jax.process_count(),
    seed=c["seed"],
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )
  state = training.train(
    state=state,
    state_shardings=state_sh,
    train_step=step,
    train_iter=it,
    mesh=mesh,
    workdir=workdir,
    on_log=on_log,
    loop=training.LoopConfig(
      steps=c["steps"],
      log_every=c["log_every"],
      checkpoint_every=c["checkpoint_every"],
      keep_checkpoints=c["keep_checkpoints"],
      progress=c["progress"],
    ),
  )
  after = pair_report(model, jax.device_get(state.params), arrays, c, c["batch_size"])
  summary = dict(
    loss=c["loss"], pair_source=c["pair_source"], num_pairs=len(pairs), before=before, after=after
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "preference_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  logging.info(
    "preference (%s, %s): train-pair accuracy %.3f -> %.3f, DPO loss %.4f -> %.4f",
    c["loss"],
    c["pair_source"],
    before["accuracy"],
    after["accuracy"],
    before["dpo_loss"],
    after["dpo_loss"],
  )
  return state, summary
