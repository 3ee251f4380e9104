"""Preference optimization jobs: train a policy on preference pairs, and the synthetic-gold
experiment that compares pair sources and losses end to end.

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
log π(y_l)``.

:func:`synthetic_gold_experiment` runs the synthetic-gold protocol (below) and writes a
markdown table.
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

from slicjax import checkpoint, optim, scoring, training
from slicjax.data import iterators
from slicjax.losses import preference as pref_losses
from slicjax.pipelines import common, rso, tasks
from slicjax.train_state import TrainState

PREFERENCE_KEYS = dict(
  loss="sigmoid_norm", beta=0.1, gamma=0.05, delta=1.0, label_smoothing=0.0, reg_weight=1.0,
  pair_source="direct", pairs="", sft_workdir="", ref_logp="stored", steps=200, batch_size=16,
  log_every=1, checkpoint_every=1000, keep_checkpoints=2, seed=0, progress=True,
)
LOSSES = ("sigmoid_norm", "dpo", "hinge", "hinge_norm", "ipo", "slic_hf")
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
  if c["ref_logp"] not in REF_LOGP:
    raise ValueError(f"preference.ref_logp={c['ref_logp']!r}; choose from {REF_LOGP}.")
  return c


def reward_scale(c: dict[str, Any]) -> float:
  """The scale ``s`` of the logged implicit rewards ``s · (log π − log π_ref)``."""
  if c["loss"] in ("sigmoid_norm", "dpo", "ipo"):
    return float(c["beta"])
  if c["loss"] in ("hinge", "hinge_norm"):
    return float(c["gamma"])
  return 1.0


def pair_loss(c: dict[str, Any], pw, pl, rw, rl, nw, nl, pt=None) -> jax.Array:
  """``[B]`` loss ``c["loss"]`` from policy (``pw``, ``pl``) and reference (``rw``, ``rl``)
  sequence log-probs, completion lengths (``nw``, ``nl``) and the target log-prob ``pt``."""
  name = c["loss"]
  if name in ("sigmoid_norm", "dpo"):
    return pref_losses.sigmoid_norm_loss(pw, pl, rw, rl, beta=c["beta"],
                                         label_smoothing=c["label_smoothing"])
  if name == "hinge":
    return pref_losses.hinge_loss(pw, pl, gamma=c["gamma"], delta=c["delta"])
  if name == "hinge_norm":
    return pref_losses.hinge_norm_loss(pw, pl, rw, rl, gamma=c["gamma"], delta=c["delta"])
  if name == "ipo":
    return pref_losses.ipo_loss(pw, pl, rw, rl, nw, nl, beta=c["beta"])
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
    pol = scoring.score_candidates(model, params, batch["inputs"], cands_BxKxL,
                                   deterministic=False, rngs={"dropout": rng})
    pw, pl = pol["logp"][:, 0], pol["logp"][:, 1]
    if on_the_fly:
      ref = scoring.score_candidates(model, state.ref_params, batch["inputs"],
                                     cands_BxKxL[:, :2])["logp"]
      rw, rl = jax.lax.stop_gradient(ref[:, 0]), jax.lax.stop_gradient(ref[:, 1])
    else:
      rw, rl = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    lengths = jnp.sum(pol["mask"], axis=-1)
    loss_B = pair_loss(c, pw, pl, rw, rl, lengths[:, 0], lengths[:, 1],
                       pol["logp"][:, 2] if with_target else None)
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
  logging.info("computing reference log-probs of %d pairs once with the SFT parameters",
               len(arrays["inputs"]))
  w, lose = _pair_logps(model, sft_params, arrays, batch_size)
  return dict(arrays, ref_chosen_logp=w.astype(np.float32), ref_rejected_logp=lose.astype(
    np.float32))


def pair_report(model, params, arrays, c: dict[str, Any], batch_size: int) -> dict[str, float]:
  """Mean DPO loss (at ``c["beta"]``), implicit-reward accuracy and policy-only accuracy of
  ``params`` on the pairs (reference log-probs from ``arrays``)."""
  pw, pl = _pair_logps(model, params, arrays, batch_size)
  rw, rl = arrays["ref_chosen_logp"], arrays["ref_rejected_logp"]
  h = (pw - rw) - (pl - rl)
  dpo = np.asarray(pref_losses.sigmoid_norm_loss(pw, pl, rw, rl, beta=c["beta"]))
  return dict(dpo_loss=float(np.mean(dpo)), accuracy=float(np.mean(h > 0)),
              policy_accuracy=float(np.mean(pw > pl)), mean_margin=float(np.mean(h)))


# --------------------------------------------------------------------------------------------
# The job


def load_pairs(config, c, *, model, params, data, pairs=None):
  """The pairs of ``c["pair_source"]``, sampling them first for an empty sample-rank dir."""
  if pairs is not None:
    return pairs
  if not c["pairs"]:
    raise ValueError("preference.pairs is empty: give a pair directory (or a text .jsonl for "
                     "pair_source=direct).")
  if c["pair_source"] != "direct" and not rso.has_chunks(c["pairs"]):
    if os.path.isfile(c["pairs"]):
      raise ValueError(f"pair_source={c['pair_source']} reads a pair directory, not the file "
                       f"{c['pairs']}; use pair_source=direct for given pairs.")
    cfg = ml_collections.ConfigDict(common.to_dict(config))
    rso_section = dict(common.to_dict(config.get("rso")))
    rso_section["mode"] = "rso" if c["pair_source"] == "rso-sample-rank" else "sft"
    cfg.rso = rso_section
    rso.rso_sample(cfg, c["pairs"], params=params, model=model, data=data)
  pairs = rso.read_pairs(c["pairs"], data)
  sources = {p["source"] for p in pairs if p.get("source")}
  if sources and sources != {c["pair_source"]}:
    raise ValueError(f"{c['pairs']} holds {sorted(sources)} pairs but preference.pair_source="
                     f"{c['pair_source']!r}; set pair_source to match or point to other pairs.")
  return pairs


_STATE_CACHE: dict[Any, Any] = {}
_STEP_CACHE: dict[Any, Any] = {}


def _state_and_step(model, c, config, mesh, params, data):
  """Train state and compiled step. Runs with the same model, optimizer and mesh share the
  state layout, and with the same loss too the compiled step (the synthetic-gold experiment and
  sweeps train several policies in one process)."""
  opt_cfg = common.to_dict(config.get("optimizer"))
  ref = params if c["ref_logp"] == "on_the_fly" else None
  state_key = (model, json.dumps(opt_cfg, sort_keys=True, default=str), c["steps"],
               mesh.axis_names, tuple(d.id for d in mesh.devices.flat), data.input_len,
               data.target_len, ref is None)
  loss_keys = ("loss", "beta", "gamma", "delta", "label_smoothing", "reg_weight", "ref_logp")
  step_key = state_key + tuple(c[k] for k in loss_keys)
  rng = jax.random.PRNGKey(c["seed"])
  if state_key in _STATE_CACHE:
    tx, schedule, state_sh = _STATE_CACHE[state_key]
    state = jax.device_put(TrainState.create(params, tx, rng, ref_params=ref), state_sh)
  else:
    tx, schedule = optim.make_optimizer(opt_cfg, c["steps"])
    state, state_sh = training.create_train_state(
      model, tx, mesh, rng, params=params, ref_params=ref,
      init_kwargs=dict(input_len=data.input_len, target_len=data.target_len),
    )
    _STATE_CACHE[state_key] = (tx, schedule, state_sh)
  if step_key not in _STEP_CACHE:
    _STEP_CACHE[step_key] = training.make_train_step(
      preference_loss_fn(model, c), tx, mesh, state_sh, schedule)
  return state, state_sh, _STEP_CACHE[step_key]


def train_preference(config, workdir: str, *, params=None, model=None, data=None, pairs=None,
                     on_log=None):
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
  workdir = common.prepare_workdir(workdir, config)
  common.log_devices()
  c = preference_config(config)
  model = model or common.model_from(config)
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if params is None:
    if not c["sft_workdir"]:
      raise ValueError("preference.sft_workdir is empty: point it at the SFT (MLE) workdir.")
    params, _ = checkpoint.load_params(c["sft_workdir"])
  pairs = load_pairs(config, c, model=model, params=params, data=data, pairs=pairs)
  arrays = rso.pairs_to_arrays(pairs, data.input_len, data.target_len)
  arrays = fill_ref_logps(model, params, arrays, c["batch_size"])
  before = pair_report(model, params, arrays, c, c["batch_size"])
  mesh = common.make_mesh(config)
  state, state_sh, step = _state_and_step(model, c, config, mesh, params, data)
  keys = ["inputs", "chosen", "rejected", "target"]
  if c["ref_logp"] == "stored":
    keys += ["ref_chosen_logp", "ref_rejected_logp"]
  it = iterators.ArrayDictIterator(
    {k: arrays[k] for k in keys}, c["batch_size"] // jax.process_count(), seed=c["seed"],
    shard_index=jax.process_index(), shard_count=jax.process_count(),
  )
  state = training.train(
    state=state, state_shardings=state_sh, train_step=step, train_iter=it, mesh=mesh,
    workdir=workdir, on_log=on_log,
    loop=training.LoopConfig(
      steps=c["steps"], log_every=c["log_every"], checkpoint_every=c["checkpoint_every"],
      keep_checkpoints=c["keep_checkpoints"], progress=c["progress"],
    ),
  )
  after = pair_report(model, jax.device_get(state.params), arrays, c, c["batch_size"])
  summary = dict(loss=c["loss"], pair_source=c["pair_source"], num_pairs=len(pairs),
                 before=before, after=after)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "preference_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  logging.info("preference (%s, %s): train-pair accuracy %.3f -> %.3f, DPO loss %.4f -> %.4f",
               c["loss"], c["pair_source"], before["accuracy"], after["accuracy"],
               before["dpo_loss"], after["dpo_loss"])
  return state, summary


# --------------------------------------------------------------------------------------------
# The synthetic-gold experiment
#
# No human preference data is available, so a fixed "gold" reward plays the human: the mean
# ROUGE-1/2/L F-measure of an output to the dataset reference (``rso.gold_rewards``). "Human"
# pairs are two samples (temperature ``human.temperature``) per prompt from a *different* policy
# than the SFT model — the SFT run's early snapshot after ``human.policy_steps`` steps — labeled
# with Bradley-Terry noise: P(y1 ≻ y2) = σ((g(y1) − g(y2)) / ``human.gold_temperature``). The
# proxy reward model sees only those pairs. Policies trained on direct / sft-sample-rank /
# rso-sample-rank pairs with each loss are compared by greedy outputs on held-out prompts: the
# proxy reward's win rate against the dataset target (RSO's Table 1 column) and against the SFT
# policy's output, and the gold reward's win rate against the SFT policy's output (against the
# target the gold reward would be 1.0 by construction, so that column is not reported).

EXPERIMENT_PRESETS: dict[str, dict[str, Any]] = {
  # Tens of seconds on a CPU: the synthetic reverse task and a one-layer model.
  "smoke": dict(
    model=dict(preset="tiny", vocab_size=17, max_len=24, d_model=32, d_ff=64, num_layers=1,
               num_heads=2, num_kv_heads=1, head_dim=16),
    data=dict(name="reverse", synthetic_vocab=12, input_len=5, target_len=6, num_train=256,
              num_eval=32),
    train=dict(steps=60, batch_size=16),
    human=dict(policy_steps=15, num_prompts=128, temperature=1.0, gold_temperature=0.1),
    reward=dict(kind="pointwise", steps=60, batch_size=16, eval_fraction=0.25),
    rso=dict(num_examples=64, num_samples=8, num_accept=4, beta=0.5, batch_size=16,
             chunk_size=64),
    preference=dict(steps=30, batch_size=16),
    experiment=dict(losses=("sigmoid_norm", "hinge"), eval_examples=32, eval_batch_size=16),
  ),
  # The embedded default: stdlib docstrings (code -> docstring summary), a small transformer.
  "default": dict(
    model=dict(preset="small", num_layers=2, d_model=128, d_ff=384, num_heads=4, num_kv_heads=2,
               head_dim=32, vocab_size=1024, max_len=256),
    data=dict(name="stdlib_docstrings", input_len=128, target_len=24, vocab_size=1000),
    train=dict(steps=900, batch_size=32),
    human=dict(policy_steps=250, num_prompts=1024, temperature=1.0, gold_temperature=0.05),
    reward=dict(kind="pointwise", steps=400, batch_size=32, eval_fraction=0.1),
    rso=dict(num_examples=512, num_samples=16, num_accept=8, beta=0.5, batch_size=32,
             chunk_size=128),
    preference=dict(steps=200, batch_size=32),
    experiment=dict(losses=("sigmoid_norm", "hinge", "hinge_norm"), eval_examples=256,
                    eval_batch_size=32),
  ),
}
HUMAN_KEYS = dict(policy_steps=100, num_prompts=512, temperature=1.0, gold_temperature=0.1,
                  seed=0)
EXPERIMENT_KEYS = dict(losses=("sigmoid_norm", "hinge"), sources=SOURCES, eval_examples=128,
                       eval_batch_size=16)


def experiment_config(preset: str, overrides=None) -> ml_collections.ConfigDict:
  """The experiment's full config: every section's defaults, the preset, then ``overrides``
  (a nested dict / ConfigDict, or a flat ``{"a.b": value}`` dict)."""
  from slicjax.pipelines import mle, reward

  if preset not in EXPERIMENT_PRESETS:
    raise ValueError(f"unknown experiment preset {preset!r}; choose from "
                     f"{sorted(EXPERIMENT_PRESETS)}.")
  p = EXPERIMENT_PRESETS[preset]
  c = dict(
    model=dict(family="transformer", **p["model"]),
    data={**tasks.DATA_KEYS, **p["data"]},
    optimizer={**optim.DEFAULTS, "learning_rate": 3e-3, "warmup_steps": 10,
               "weight_decay": 0.01},
    train={**mle.TRAIN_KEYS, "log_every": 25, "checkpoint_every": 10**9, **p["train"]},
    human={**HUMAN_KEYS, **p["human"]},
    reward={**reward.REWARD_KEYS, "log_every": 25, "checkpoint_every": 10**9, **p["reward"]},
    reward_optimizer={**optim.DEFAULTS, "learning_rate": 1e-3, "warmup_steps": 5,
                      "schedule": "constant"},
    rso={**rso.RSO_KEYS, **p["rso"]},
    preference={**PREFERENCE_KEYS, "log_every": 5, "checkpoint_every": 10**9,
                **p["preference"]},
    preference_optimizer={**optim.DEFAULTS, "learning_rate": 5e-4, "warmup_steps": 3,
                          "schedule": "constant"},
    experiment={**EXPERIMENT_KEYS, **p["experiment"]},
    mesh_shape=(-1, 1, 1),
  )
  cfg = ml_collections.ConfigDict(c)
  if overrides:
    flat = common.to_dict(overrides)
    if any("." in k for k in flat):
      cfg.update_from_flattened_dict(flat)
    else:
      cfg.update(flat)
  for section, keys in (("human", HUMAN_KEYS), ("experiment", EXPERIMENT_KEYS)):
    common.check_keys(common.to_dict(cfg[section]), keys, section)
  return cfg


def _train_sft(cfg, workdir, model, data, mesh):
  """MLE fine-tuning; returns ``(sft_params, early_params)`` (the early snapshot is the
  "human" policy)."""
  from slicjax.pipelines import mle

  t = mle.train_config(cfg)
  h = cfg.human
  if not 0 < h.policy_steps < t["steps"]:
    raise ValueError(f"human.policy_steps must be in (0, train.steps={t['steps']}), got "
                     f"{h.policy_steps}.")
  tx, schedule = optim.make_optimizer(common.to_dict(cfg.optimizer), t["steps"])
  state, sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(t["seed"]),
    init_kwargs=dict(input_len=data.input_len, target_len=data.target_len))
  step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh, schedule)
  it = data.train_iter()
  snapshots = []
  for steps in (h.policy_steps, t["steps"]):
    state = training.train(
      state=state, state_shardings=sh, train_step=step, train_iter=it, mesh=mesh,
      workdir=workdir, loop=training.LoopConfig(steps=steps, log_every=t["log_every"],
                                                checkpoint_every=10**9, progress=t["progress"]))
    snapshots.append(jax.device_get(state.params))
  return snapshots[1], snapshots[0]


def gold_pairs(cfg, out_dir, *, model, human_params, sft_params, data):
  """Writes the "human" pairs (pair directory, source ``direct``); returns its rows."""
  h = cfg.human
  bs = cfg.rso.batch_size
  c = dict(seed=h.seed, temperature=h.temperature, top_k=0, top_p=1.0, max_len=0)
  examples = data.train_examples
  n = min(h.num_prompts, len(examples))

  def make_rows(idx):
    ids = rso._pad_indices(idx, bs)
    arrays = iterators.pad_batch([examples[i] for i in ids], data.input_len, data.target_len)
    inputs, targets = arrays["inputs"], arrays["targets"]
    cands = rso.sample_completions(c, model, human_params, data, inputs, ids, 2)
    gold = rso.gold_rewards(data, cands, targets)
    ref = rso.sequence_logps(model, sft_params, inputs, cands)
    u = np.random.default_rng([h.seed, idx[0]]).uniform(size=len(ids))
    first_wins = u < 1.0 / (1.0 + np.exp(-(gold[:, 0] - gold[:, 1]) / h.gold_temperature))
    rows = []
    for j, i in enumerate(idx):
      w, lose = (0, 1) if first_wins[j] else (1, 0)
      same = np.array_equal(cands[j, 0], cands[j, 1]) or not cands[j].any(-1).all()
      pairs = [] if same else [dict(
        chosen=rso._ids(cands[j, w]), rejected=rso._ids(cands[j, lose]),
        chosen_text=data.detokenize(cands[j, w]), rejected_text=data.detokenize(cands[j, lose]),
        chosen_reward=float(gold[j, w]), rejected_reward=float(gold[j, lose]),
        ref_chosen_logp=float(ref[j, w]), ref_rejected_logp=float(ref[j, lose]))]
      rows.append(dict(
        index=i, source="direct", prompt=rso._ids(inputs[j]), target=rso._ids(targets[j]),
        prompt_text=data.detokenize(inputs[j]), target_text=data.detokenize(targets[j]),
        num_samples=2, num_valid=int(cands[j].any(-1).sum()), num_accepted=2,
        num_unique=1 if same else 2, expected_acceptance=None, accepted_rewards=gold[j].tolist(),
        num_ties=None, pairs=pairs))
    return rows

  rso.write_chunks(out_dir, n, chunk_size=cfg.rso.chunk_size, batch_size=bs,
                   make_rows=make_rows, desc="human pairs", progress=cfg.train.progress)
  return rso.read_rows(out_dir)


def _greedy_outputs(model, params, data, examples, batch_size):
  from slicjax.decoding import api as decoding_api

  outs = []
  for lo in range(0, len(examples), batch_size):
    chunk = examples[lo : lo + batch_size]
    batch = iterators.pad_batch(chunk + [chunk[-1]] * (batch_size - len(chunk)), data.input_len,
                                data.target_len)
    res = decoding_api.decode(model, params, jnp.asarray(batch["inputs"]), method="greedy",
                              max_len=data.target_len)
    outs.append(rso.clean_completions(res.tokens_BxKxL, data.target_len)[: len(chunk), 0])
  return np.concatenate(outs)


def evaluate_policies(policies, *, model, data, proxy, examples, batch_size):
  """Greedy outputs of each policy on ``examples`` scored by the proxy and gold rewards."""
  from slicjax.evaluation import metrics

  arrays = iterators.pad_batch(examples, data.input_len, data.target_len)
  inputs, targets = arrays["inputs"], arrays["targets"]
  outs = {name: _greedy_outputs(model, p, data, examples, batch_size)
          for name, p in policies.items()}
  gold = {name: rso.gold_rewards(data, o[:, None], targets)[:, 0] for name, o in outs.items()}

  def win_prob(y, other):
    probs = []
    for lo in range(0, len(y), batch_size):
      idx = np.arange(lo, lo + batch_size) % len(y)
      probs.append(proxy.win_prob(inputs[idx], y[idx], other[idx])[: min(batch_size,
                                                                         len(y) - lo)])
    return np.concatenate(probs)

  sft = outs["SFT"]
  result = {}
  for name, o in outs.items():
    result[name] = dict(
      proxy_win_vs_target=metrics.win_rate(win_prob(o, targets)),
      proxy_win_vs_sft=metrics.win_rate(win_prob(o, sft)),
      gold_win_vs_sft=metrics.win_rate(gold[name], gold["SFT"]),
      mean_gold=float(np.mean(gold[name])),
      mean_length=float(np.mean((o != 0).sum(-1))),
    )
  return result


def markdown_report(preset, rows, reward_report, acceptance, seconds) -> str:
  lines = [
    f"# Synthetic-gold preference experiment (preset `{preset}`)", "",
    "Gold reward: mean ROUGE-1/2/L F of the output to the dataset reference. \"Human\" pairs: "
    "two temperature samples per prompt from an early SFT snapshot, labeled with Bradley-Terry "
    "noise from the gold reward. The proxy reward model is trained on those pairs only. Win "
    "rates use greedy outputs on held-out prompts; ties count one half.", "",
    f"Proxy reward model ({reward_report['kind']}): held-out pair accuracy "
    f"{reward_report['heldout_accuracy']:.3f} on {reward_report['heldout_pairs']} pairs (train "
    f"{reward_report['train_accuracy']:.3f} on {reward_report['train_pairs']}).", "",
    "| pairs | loss | #pairs | acceptance | train-pair acc. | proxy win vs target | "
    "proxy win vs SFT | gold win vs SFT | mean gold | mean length |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    acc = acceptance.get(r["source"], {}).get("expected_acceptance", float("nan"))
    lines.append(
      f"| {r['source']} | {r['loss']} | {r.get('num_pairs', '-')} | "
      f"{'-' if np.isnan(acc) else f'{acc:.3f}'} | {r.get('pair_accuracy', float('nan')):.3f} | "
      f"{r['proxy_win_vs_target'] * 100:.1f}% | {r['proxy_win_vs_sft'] * 100:.1f}% | "
      f"{r['gold_win_vs_sft'] * 100:.1f}% | {r['mean_gold']:.3f} | {r['mean_length']:.1f} |")
  lines += ["", f"Total time: {seconds:.0f} s."]
  return "\n".join(lines) + "\n"


def synthetic_gold_experiment(config=None, workdir: str = "", preset: str = "smoke"):
  """Runs the synthetic-gold protocol (see the comment above) and writes ``report.md``.

  Args:
    config: overrides of :func:`experiment_config` (``None`` for the preset as is).
    workdir: every stage's output goes under it.
    preset: ``smoke`` (synthetic task, seconds to a minute on CPU) or ``default``.

  Returns:
    dict with ``rows`` (one per policy), ``reward``, ``acceptance`` and ``report`` (the path).
  """
  import time

  from slicjax.pipelines import reward as reward_lib

  t0 = time.time()
  cfg = experiment_config(preset, config)
  workdir = common.prepare_workdir(workdir, cfg)
  common.log_devices()
  mesh = common.make_mesh(cfg)
  data = tasks.load(cfg, batch_size=cfg.train.batch_size, seed=cfg.train.seed, mesh=mesh)
  model = common.model_from(cfg)
  sft, early = _train_sft(cfg, os.path.join(workdir, "sft"), model, data, mesh)
  human = gold_pairs(cfg, os.path.join(workdir, "pairs_direct"), model=model,
                     human_params=early, sft_params=sft, data=data)
  proxy, reward_report = reward_lib.train_reward(
    cfg, os.path.join(workdir, "reward"), data=data, pairs=rso.flatten_pairs(human),
    init_params=sft)
  pair_sets = {"direct": rso.flatten_pairs(human)}
  acceptance = {"direct": rso.acceptance_summary(human)}
  for source, mode in (("sft-sample-rank", "sft"), ("rso-sample-rank", "rso")):
    stage = ml_collections.ConfigDict(cfg.to_dict())
    stage.rso.mode = mode
    out = os.path.join(workdir, f"pairs_{mode}")
    rso.rso_sample(stage, out, params=sft, model=model, data=data, reward=proxy)
    rows = rso.read_rows(out)
    pair_sets[source] = rso.flatten_pairs(rows)
    acceptance[source] = rso.acceptance_summary(rows)
  policies, info = {"SFT": sft}, {"SFT": dict(source="SFT", loss="-")}
  for source in cfg.experiment.sources:
    for loss in cfg.experiment.losses:
      stage = ml_collections.ConfigDict(cfg.to_dict())
      stage.optimizer = cfg.preference_optimizer
      stage.preference.loss, stage.preference.pair_source = loss, source
      name = f"{source}/{loss}"
      state, summary = train_preference(
        stage, os.path.join(workdir, "policies", f"{source}_{loss}"), params=sft, model=model,
        data=data, pairs=pair_sets[source])
      policies[name] = jax.device_get(state.params)
      info[name] = dict(source=source, loss=loss, num_pairs=summary["num_pairs"],
                        pair_accuracy=summary["after"]["accuracy"])
  ev = evaluate_policies(policies, model=model, data=data, proxy=proxy,
                         examples=data.eval_examples[: cfg.experiment.eval_examples],
                         batch_size=cfg.experiment.eval_batch_size)
  rows = [dict(info[name], policy=name, **ev[name]) for name in policies]
  text = markdown_report(preset, rows, reward_report, acceptance, time.time() - t0)
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(dict(rows=rows, reward=reward_report, acceptance=acceptance), f, indent=2,
              default=float)
  print(text, flush=True)
  return dict(rows=rows, reward=reward_report, acceptance=acceptance, report=path)
