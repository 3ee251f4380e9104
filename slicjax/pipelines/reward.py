"""Reward-model training job and the loaded reward used by RSO sampling and evaluation.

``train_reward(config, workdir)`` trains ``config.reward.kind``:

* ``pointwise`` — :class:`~slicjax.models.reward.RewardModel` with the Bradley–Terry loss;
* ``ranker`` — :class:`~slicjax.models.reward.PairwiseRanker` (text-to-text, random order flips),
  its separators taken from the task's tokenizer, or five reserved ids past the task vocabulary
  for token-id tasks (then the reward model's ``vocab_size`` must be ``>= task vocab + 5``),

on preference pairs (``reward.pairs``: a pair directory or a text ``.jsonl`` of
``{prompt, chosen, rejected}``). Prompts are split into train and held-out sets
(``reward.eval_fraction``) and the job reports held-out pair accuracy in
``<workdir>/reward_eval.json``; ``<workdir>/reward_model.json`` records what
:func:`load_reward` needs to rebuild the model.

The reward network is ``config.reward_model`` (a model dict) or, if absent, ``config.model``;
``reward.init_from`` (a workdir) initializes its backbone from the SFT policy's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from slicjax import checkpoint, optim, training
from slicjax.data import iterators
from slicjax.models import reward as reward_models
from slicjax.models.factory import build_model
from slicjax.pipelines import common, preference_pairs, tasks, validation
from slicjax.preference import ranking

REWARD_KEYS = dict(
  kind="pointwise",
  pairs="",
  init_from="",
  steps=300,
  batch_size=16,
  eval_fraction=0.1,
  eval_every=0,
  log_every=25,
  checkpoint_every=1000,
  keep_checkpoints=2,
  seed=0,
  symmetric=True,
  progress=True,
)
KINDS = ("pointwise", "ranker")
_INFO = "reward_model.json"


def reward_config(config) -> dict[str, Any]:
  c = common.to_dict(config.get("reward"))
  common.check_keys(c, REWARD_KEYS, "reward")
  c = {**REWARD_KEYS, **c}
  if c["kind"] not in KINDS:
    raise ValueError(f"reward.kind={c['kind']!r}; choose from {KINDS}.")
  if not 0.0 <= c["eval_fraction"] < 1.0:
    raise ValueError(f"reward.eval_fraction must be in [0, 1), got {c['eval_fraction']}.")
  for k in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    validation.count(c[k], f"reward.{k}")
  if c["eval_every"] < 0:
    raise ValueError(f"reward.eval_every must be >= 0 (0 = no early stopping), got "
                     f"{c['eval_every']}.")
  if c["eval_every"] and c["eval_fraction"] == 0:
    raise ValueError("reward.eval_every > 0 selects the step on held-out pairs, but "
                     "reward.eval_fraction is 0; hold out prompts (e.g. 0.2) or set eval_every=0.")
  return c


def reward_model_config(config) -> dict[str, Any]:
  rm = config.get("reward_model")
  return common.to_dict(rm) if rm else common.to_dict(config.model)


def _backbone(model_cfg: dict[str, Any]):
  """``build_model(model_cfg)``, or a pretrained checkpoint's model when ``model_cfg`` is
  ``{"pretrained": <config.pretrained>, "max_len": n}`` (what a pretrained run records)."""
  if "pretrained" in model_cfg:
    from slicjax.interop import pretrained

    p = model_cfg["pretrained"]
    model, _, _ = pretrained.load_pretrained(
      p["init_from"], max_len=model_cfg.get("max_len") or None, dtype=p.get("dtype"),
      prompt_format=p.get("prompt_format", "chat"), instruction=p.get("instruction", ""),
      system_prompt=p.get("system_prompt", ""),
      raw_template=p.get("raw_template", "{instruction}{input}\n"),
    )
    return model
  return build_model(model_cfg)


def make_network(kind: str, model_cfg: dict[str, Any], data=None, fmt=None, backbone=None):
  """The reward network of ``kind`` over ``backbone`` (default: built from ``model_cfg``)."""
  backbone = backbone if backbone is not None else _backbone(model_cfg)
  if kind == "pointwise":
    return reward_models.RewardModel(backbone)
  if fmt is None:
    if data is None:
      raise ValueError("a ranker needs the task (for its tokenizer or vocabulary size).")
    fmt = (
      reward_models.PairFormat.from_tokenizer(data.tokenizer)
      if data.tokenizer is not None
      else reward_models.PairFormat.reserved(data.vocab_size)
    )
  return reward_models.PairwiseRanker(backbone, fmt)


def _input_len(net, data) -> int:
  if isinstance(net, reward_models.PairwiseRanker):
    return net.fmt.input_len(data.input_len, data.target_len)
  return data.input_len


# --------------------------------------------------------------------------------------------
# Compiled helpers (the network is a static, hashable argument: one program per shape)


@functools.partial(jax.jit, static_argnums=0)
def _pointwise_rewards(net, params, inputs_BxS, cands_BxKxL):
  return net.candidate_rewards(params, inputs_BxS, cands_BxKxL)


@functools.partial(jax.jit, static_argnums=0)
def _ranker_rewards(net, params, inputs_BxS, cands_BxKxL, baseline_BxL):
  return net.candidate_rewards(params, inputs_BxS, cands_BxKxL, baseline_BxL)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _ranker_pairs(net, params, inputs_BxS, cands_BxMxL, mask_BxM, method, symmetric, rng):
  compare = net.compare_fn(params, inputs_BxS, cands_BxMxL, symmetric=symmetric)
  if method == "tournament":
    return ranking.tournament_pairs(compare, mask_BxM=mask_BxM, rng=rng)
  return ranking.first_round_pairs(compare, mask_BxM=mask_BxM, rng=rng)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _win_prob(net, params, inputs_BxS, y_BxL, other_BxL, symmetric):
  if isinstance(net, reward_models.RewardModel):
    both = jnp.stack([y_BxL, other_BxL], axis=1)
    r = net.candidate_rewards(params, inputs_BxS, both)
    return jax.nn.sigmoid(r[:, 0] - r[:, 1])
  p = net.prob_a(params, inputs_BxS, y_BxL, other_BxL)
  if symmetric:
    p = 0.5 * (p + 1.0 - net.prob_a(params, inputs_BxS, other_BxL, y_BxL))
  return p


@dataclasses.dataclass
class LoadedReward:
  """A trained reward network with its parameters, as RSO sampling and evaluation use it.

  Attributes:
    kind: ``pointwise`` or ``ranker``.
    net: the :class:`RewardModel` or :class:`PairwiseRanker`.
    params: its parameters.
    symmetric: rankers average both presentation orders when comparing two completions.
  """

  kind: str
  net: Any
  params: Any
  symmetric: bool = True

  def candidate_rewards(self, inputs_BxS, cands_BxKxL, baseline_BxL=None) -> np.ndarray:
    """``[B, K]`` pointwise rewards; a ranker scores ``logit ρ(x, y, y_b)`` against
    ``baseline_BxL`` (default: each prompt's first candidate)."""
    inputs, cands = jnp.asarray(inputs_BxS), jnp.asarray(cands_BxKxL)
    if self.kind == "pointwise":
      return np.asarray(_pointwise_rewards(self.net, self.params, inputs, cands))
    base = cands[:, 0] if baseline_BxL is None else jnp.asarray(baseline_BxL)
    if base.shape[-1] != cands.shape[-1]:
      raise ValueError(f"ranker baseline has {base.shape[-1]} tokens per row, candidates "
                       f"{cands.shape[-1]}; pad both to data.target_len.")
    return np.asarray(_ranker_rewards(self.net, self.params, inputs, cands, base))

  def label_pairs(self, inputs_BxS, cands_BxMxL, mask_BxM, rng, method="tournament"):
    """(chosen, rejected) indices from the ranker's pairwise judgements (see ``ranking``)."""
    return _ranker_pairs(
      self.net,
      self.params,
      jnp.asarray(inputs_BxS),
      jnp.asarray(cands_BxMxL),
      jnp.asarray(mask_BxM),
      method,
      self.symmetric,
      rng,
    )

  def win_prob(self, inputs_BxS, y_BxL, other_BxL) -> np.ndarray:
    """``[B]`` probability that ``y`` beats ``other`` (pointwise: ``σ(r(y) − r(other))``)."""
    return np.asarray(
      _win_prob(
        self.net,
        self.params,
        jnp.asarray(inputs_BxS),
        jnp.asarray(y_BxL),
        jnp.asarray(other_BxL),
        self.symmetric,
      )
    )


def load_reward(workdir: str, *, symmetric: bool = True) -> LoadedReward:
  """Rebuilds the reward network of a :func:`train_reward` run and loads its parameters."""
  path = os.path.join(workdir, _INFO)
  if not os.path.isfile(path):
    raise ValueError(
      f"{path} not found: {workdir!r} is not a train_reward workdir (run "
      "experiments/train_reward.py first)."
    )
  with open(path) as f:
    info = json.load(f)
  fmt = reward_models.PairFormat.from_dict(info["format"]) if info.get("format") else None
  net = make_network(info["kind"], info["model"], fmt=fmt)
  params, _ = checkpoint.load_params(workdir)
  return LoadedReward(info["kind"], net, params, symmetric)


# --------------------------------------------------------------------------------------------
# Training


def split_pairs(pairs, eval_fraction: float, seed: int):
  """Train / held-out pairs, split by prompt (all pairs of a prompt go to one side)."""
  prompts = sorted({p["index"] for p in pairs})
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(prompts))
  n_eval = int(round(eval_fraction * len(prompts)))
  held = {prompts[i] for i in order[:n_eval]}
  train = [p for p in pairs if p["index"] not in held]
  heldout = [p for p in pairs if p["index"] in held]
  if not train:
    raise ValueError(
      f"no training pairs left after holding out {eval_fraction:.0%} of "
      f"{len(prompts)} prompts; lower reward.eval_fraction or add pairs."
    )
  return train, heldout


def pair_loss_fn(net):
  def loss_fn(params, batch, rng, state):
    del state
    loss, m = net.pair_loss(params, batch, rng)
    return jnp.mean(loss), {"accuracy": jnp.mean(m["accuracy"])}

  return loss_fn


@functools.partial(jax.jit, static_argnums=(0, 5))
def _pair_correct(net, params, inputs, chosen, rejected, symmetric):
  if isinstance(net, reward_models.RewardModel):
    return net.pair_loss(params, {"inputs": inputs, "chosen": chosen, "rejected": rejected})[1][
      "accuracy"
    ]
  if symmetric:
    return net.pair_accuracy(params, inputs, chosen, rejected)
  return (net.prob_a(params, inputs, chosen, rejected) > 0.5).astype(jnp.float32)


def pair_accuracy(net, params, arrays, *, batch_size: int, symmetric: bool = True) -> float:
  """Fraction of pairs whose chosen completion the reward network prefers."""
  if len(arrays["inputs"]) == 0:
    return float("nan")
  return float(np.mean(pair_correct(net, params, arrays, batch_size=batch_size,
                                    symmetric=symmetric)))


def pair_correct(net, params, arrays, *, batch_size: int, symmetric: bool = True) -> np.ndarray:
  """``[N]`` 1.0 where the reward network prefers the chosen completion of pair n, else 0.0."""
  n = len(arrays["inputs"])
  correct = []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, lo + batch_size) % n  # fixed shape: wrap the last batch
    got = _pair_correct(
      net,
      params,
      jnp.asarray(arrays["inputs"][idx]),
      jnp.asarray(arrays["chosen"][idx]),
      jnp.asarray(arrays["rejected"][idx]),
      symmetric,
    )
    correct.append(np.asarray(got)[: min(batch_size, n - lo)])
  return np.concatenate(correct) if correct else np.zeros((0,), np.float32)


def heldout_report(correct, pairs, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """Held-out accuracy of a reward network with its 95% bootstrap interval over pairs, and,
  when the pairs carry their gold rewards (``chosen_reward``/``rejected_reward``, as the
  synthetic-gold pairs do): the network's agreement with the noise-free gold order (pairs with
  a gold tie left out) and the accuracy the gold reward itself reaches on these labels (the
  ceiling that Bradley-Terry label noise leaves; a gold tie counts one half)."""
  from slicjax.evaluation import metrics

  correct = np.asarray(correct, np.float64)
  out = dict(heldout_accuracy=float("nan"), heldout_accuracy_ci95=[float("nan")] * 2)
  if correct.size == 0:
    return out
  mean, lo, hi = metrics.bootstrap_ci(correct, num_resamples=num_resamples, seed=seed)
  out.update(heldout_accuracy=mean, heldout_accuracy_ci95=[lo, hi])
  gold = [(p.get("chosen_reward"), p.get("rejected_reward")) for p in pairs]
  if gold and all(a is not None and b is not None for a, b in gold):
    diff = np.asarray([a - b for a, b in gold], np.float64)
    out["gold_label_accuracy"] = metrics.win_rate(diff, np.zeros_like(diff))
    untied = diff != 0
    if untied.any():
      agree = np.where(diff[untied] > 0, correct[untied], 1.0 - correct[untied])
      m, lo, hi = metrics.bootstrap_ci(agree, num_resamples=num_resamples, seed=seed)
      out.update(gold_order_accuracy=m, gold_order_accuracy_ci95=[lo, hi],
                 gold_order_pairs=int(untied.sum()))
  return out


def train_reward(config, workdir: str, *, data=None, pairs=None, init_params=None):
  """Trains the reward network and reports held-out pair accuracy.

  Args:
    config: job config (``model``/``reward_model``, ``data``, ``reward``, and
      ``reward_optimizer`` or ``optimizer``).
    workdir: checkpoints, metrics, ``reward_model.json`` and ``reward_eval.json`` go here.
    data: the task (loaded from ``config.data`` if not given).
    pairs: flat pair dicts (:func:`slicjax.pipelines.preference_pairs.read_pairs`) instead of
      ``reward.pairs``.
    init_params: backbone (pointwise) or model (ranker) parameters instead of
      ``reward.init_from``.

  Returns:
    ``(loaded_reward, report)`` with ``report`` the dict written to ``reward_eval.json``.
  """
  c = reward_config(config)
  if pairs is None:
    validation.file_or_dir(c["pairs"], "reward.pairs",
                           "give a pair directory (rso_sample output) or a text pairs .jsonl")
  if init_params is None:
    validation.run_dir(c["init_from"], "reward.init_from")
  workdir = common.prepare_workdir(workdir, config)
  common.log_devices()
  data = data or tasks.load(config, batch_size=c["batch_size"], seed=c["seed"])
  if pairs is None:
    if not c["pairs"]:
      raise ValueError("reward.pairs is empty: give a pair directory or a text pairs .jsonl.")
    pairs = preference_pairs.read_pairs(c["pairs"], data)
  train_pairs, held_pairs = split_pairs(pairs, c["eval_fraction"], c["seed"])
  select_pairs = []
  if c["eval_every"] and held_pairs:
    # Early stopping selects on half of the held-out prompts; the other half is reported, so the
    # reported accuracy is not the maximum of the selection curve.
    if len({p["index"] for p in held_pairs}) < 2:
      raise ValueError("reward.eval_every > 0 needs >= 2 held-out prompts (one to select the "
                       "step, one to report); raise reward.eval_fraction or add pairs.")
    held_pairs, select_pairs = split_pairs(held_pairs, 0.5, c["seed"] + 1)
  model_cfg = reward_model_config(config)
  pre = common.pretrained(config)  # pretrained.init_from overrides reward_model / model
  backbone = None
  if pre is not None:  # the reward network's backbone is the pretrained model
    backbone = pre[0]
    model_cfg = dict(pretrained=common.pretrained_config(config), max_len=backbone.max_len)
    if init_params is None and not c["init_from"]:
      init_params = pre[1]
  net = make_network(c["kind"], model_cfg, data, backbone=backbone)
  backbone = net.backbone if c["kind"] == "pointwise" else net.model
  if backbone.vocab_size < data.vocab_size:
    raise ValueError(
      f"reward model vocab_size {backbone.vocab_size} < the task's "
      f"{data.vocab_size}; raise reward_model.vocab_size."
    )
  input_len = _input_len(net, data)
  if init_params is None and c["init_from"]:
    init_params = common.params_from(config, c["init_from"], "reward.init_from")
  params = None
  rng = jax.random.PRNGKey(c["seed"])
  if init_params is not None:
    params = (
      net.params_from_backbone(init_params, rng, input_len=input_len, target_len=data.target_len)
      if c["kind"] == "pointwise"
      else init_params
    )
  arrays = preference_pairs.pairs_to_arrays(train_pairs, data.input_len, data.target_len)
  held = (preference_pairs.pairs_to_arrays(held_pairs, data.input_len, data.target_len)
          if held_pairs else None)
  mesh = common.make_mesh(config)
  opt_cfg = config.get("reward_optimizer") or config.get("optimizer")
  tx, schedule = optim.make_optimizer(common.to_dict(opt_cfg), c["steps"])
  state, state_sh = training.create_train_state(
    net,
    tx,
    mesh,
    rng,
    params=params,
    init_kwargs=dict(input_len=input_len, target_len=data.target_len),
  )
  train_arrays = {k: arrays[k] for k in ("inputs", "chosen", "rejected")}
  it = iterators.ArrayDictIterator(
    train_arrays,
    c["batch_size"] // jax.process_count(),
    seed=c["seed"],
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )
  step = training.make_train_step(pair_loss_fn(net), tx, mesh, state_sh, schedule)
  bs = c["batch_size"]
  eval_fn = None
  if select_pairs:
    sel = preference_pairs.pairs_to_arrays(select_pairs, data.input_len, data.target_len)
    keeper = checkpoint.BestKeeper(workdir, "select_error")

    def eval_fn(st):
      acc = pair_accuracy(net, st.params, sel, batch_size=bs, symmetric=c["symmetric"])
      ev = {"select_accuracy": acc}
      if keeper.update(int(jax.device_get(st.step)), st.params, 1.0 - acc):
        ev["best"] = 1.0
      return ev

  state = training.train(
    state=state,
    state_shardings=state_sh,
    train_step=step,
    train_iter=it,
    mesh=mesh,
    workdir=workdir,
    eval_fn=eval_fn,
    loop=training.LoopConfig(
      steps=c["steps"],
      log_every=c["log_every"],
      eval_every=c["eval_every"],
      checkpoint_every=c["checkpoint_every"],
      keep_checkpoints=c["keep_checkpoints"],
      progress=c["progress"],
    ),
  )
  params = jax.device_get(state.params)
  selected = None
  if select_pairs:  # the parameters of the best step on the selection half
    params, selected = checkpoint.load_params(workdir)
  report = dict(
    kind=c["kind"],
    train_pairs=len(train_pairs),
    heldout_pairs=len(held_pairs),
    select_pairs=len(select_pairs),
    selected_step=selected if selected is not None else c["steps"],
    train_accuracy=pair_accuracy(net, params, arrays, batch_size=bs, symmetric=c["symmetric"]),
  )
  held_correct = (pair_correct(net, params, held, batch_size=bs, symmetric=c["symmetric"])
                  if held is not None else np.zeros((0,)))
  report.update(heldout_report(held_correct, held_pairs, seed=c["seed"]))
  report["heldout_correct"] = [int(v) for v in held_correct]  # per held-out pair, to pool
  if jax.process_index() == 0:
    info = dict(
      kind=c["kind"], model=model_cfg, format=net.fmt.to_dict() if c["kind"] == "ranker" else None
    )
    with open(os.path.join(workdir, _INFO), "w") as f:
      json.dump(info, f, indent=2)
    with open(os.path.join(workdir, "reward_eval.json"), "w") as f:
      json.dump(report, f, indent=2)
  logging.info(
    "reward model (%s): held-out pair accuracy %.3f on %d pairs (train %.3f)",
    c["kind"],
    report["heldout_accuracy"],
    len(held_pairs),
    report["train_accuracy"],
  )
  return LoadedReward(c["kind"], net, params, c["symmetric"]), report
