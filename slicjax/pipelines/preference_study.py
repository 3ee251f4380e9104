"""The synthetic-gold preference study over seeds: runs :func:`gold_experiment.
synthetic_gold_experiment` once per seed (every stage's seed set to it: SFT, "human" pairs,
reward model, pair sampling, preference training) and pools the seeds into one table with 95%
bootstrap intervals.

Pooling: the seeds judge the same held-out prompts, so each prompt's gold win against SFT is
averaged over the seeds and the interval is a bootstrap over prompts; orderings between pair
sources are paired differences of those per-prompt wins. The reward model's held-out accuracy
pools every seed's held-out pairs (each seed holds out its own prompts). Each seed's own value
is reported beside the pooled one, so seed-to-seed spread is visible.

Output: ``preference_effect.json`` (``{"models": {name: {...}}}``, one entry per start model,
merged into an existing file) and a markdown table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from slicjax.evaluation import metrics
from slicjax.pipelines import gold_experiment

SEED_KEYS = ("train.seed", "human.seed", "reward.seed", "rso.seed", "preference.seed")


def seed_overrides(overrides: dict[str, Any], seed: int) -> dict[str, Any]:
  """``overrides`` with every stage's seed set to ``seed``."""
  return {**overrides, **{k: int(seed) for k in SEED_KEYS}}


def run_seed(preset: str, overrides: dict[str, Any], workdir: str, seed: int,
             split: str = "validation") -> str:
  """Runs one seed into ``<workdir>/seed_<seed>`` unless its results for ``split`` exist (a
  rerun resumes; another split only evaluates the trained policies); returns that
  directory."""
  out = os.path.join(workdir, f"seed_{seed}")
  if not os.path.isfile(os.path.join(out, f"results{gold_experiment.split_suffix(split)}.json")):
    gold_experiment.synthetic_gold_experiment(
      {**seed_overrides(overrides, seed), "experiment.eval_split": split}, out, preset)
  return out


def _read_seed(d: str, split: str = "validation") -> dict[str, Any]:
  sfx = gold_experiment.split_suffix(split)
  for f in (f"results{sfx}.json", f"eval_outputs{sfx}.jsonl",
            os.path.join("reward", "reward_eval.json")):
    if not os.path.isfile(os.path.join(d, f)):
      raise ValueError(f"{d} has no {f}: run the seed first (experiments/preference_study.py "
                       "without --aggregate_only).")
  with open(os.path.join(d, f"results{sfx}.json")) as f:
    res = json.load(f)
  with open(os.path.join(d, "reward", "reward_eval.json")) as f:
    rm = json.load(f)
  wins: dict[str, dict[int, float]] = {}
  with open(os.path.join(d, f"eval_outputs{sfx}.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      wins.setdefault(r["policy"], {})[r["example"]] = r["gold_win_vs_sft"]
  return dict(results=res, reward=rm, wins=wins)


def _ci(values, resamples, seed=0) -> dict[str, Any]:
  m, lo, hi = metrics.bootstrap_ci(values, num_resamples=resamples, seed=seed)
  return dict(mean=m, ci95=[lo, hi])


def aggregate(seed_dirs: dict[int, str], *, resamples: int = 1000,
              split: str = "validation") -> dict[str, Any]:
  """Pools the seeds' results on ``split`` (see the module docstring)."""
  if not seed_dirs:
    raise ValueError("aggregate: no seed directories given.")
  seeds = {s: _read_seed(d, split) for s, d in sorted(seed_dirs.items())}
  first = next(iter(seeds.values()))
  policies = [r["policy"] for r in first["results"]["rows"] if r["policy"] != "SFT"]
  examples = sorted(first["wins"]["SFT"])
  for s, v in seeds.items():
    if sorted(v["wins"]["SFT"]) != examples:
      raise ValueError(f"seed {s} judged other prompts than seed {min(seeds)}; every seed must "
                       "use the same experiment.eval_examples.")

  def per_prompt(policy):  # [examples] gold win vs SFT averaged over the seeds
    return np.mean([[v["wins"][policy][e] for e in examples] for v in seeds.values()], axis=0)

  correct = []
  for v in seeds.values():
    if "heldout_correct" not in v["reward"]:
      raise ValueError("reward_eval.json lacks heldout_correct (written by this version of "
                       "train_reward); rerun the seed's reward stage.")
    correct += list(v["reward"]["heldout_correct"])
  out: dict[str, Any] = dict(
    split=split,
    seeds=sorted(seeds),
    num_eval_prompts=len(examples),
    rm_heldout_accuracy=dict(
      _ci(correct, resamples),
      num_pairs=len(correct),
      per_seed={str(s): v["reward"]["heldout_accuracy"] for s, v in seeds.items()},
    ),
    rm_gold_label_accuracy={str(s): v["reward"].get("gold_label_accuracy")
                            for s, v in seeds.items()},
    cells={},
    orderings=[],
  )
  for name in policies:
    rows = {s: next(r for r in v["results"]["rows"] if r["policy"] == name)
            for s, v in seeds.items()}
    any_row = next(iter(rows.values()))
    out["cells"][name] = dict(
      source=any_row["source"],
      loss=any_row["loss"],
      gold_win_vs_sft=dict(
        _ci(per_prompt(name), resamples),
        per_seed={str(s): r["gold_win_vs_sft"] for s, r in rows.items()},
      ),
      mean_gold={str(s): r["mean_gold"] for s, r in rows.items()},
      mean_length={str(s): r["mean_length"] for s, r in rows.items()},
      proxy_win_vs_sft={str(s): r["proxy_win_vs_sft"] for s, r in rows.items()},
      num_pairs={str(s): r.get("num_pairs") for s, r in rows.items()},
    )
  losses = sorted({c["loss"] for c in out["cells"].values()})
  for loss in losses:  # RSO's Table 1 ordering, per loss: rso ≥ sft-sample-rank ≥ direct
    for a, b in (("rso-sample-rank", "sft-sample-rank"), ("sft-sample-rank", "direct"),
                 ("rso-sample-rank", "direct")):
      na, nb = f"{a}/{loss}", f"{b}/{loss}"
      if na in out["cells"] and nb in out["cells"]:
        d, lo, hi = metrics.paired_bootstrap_ci(per_prompt(na), per_prompt(nb),
                                                num_resamples=resamples)
        out["orderings"].append(dict(a=na, b=nb, diff=d, ci95=[lo, hi],
                                     within_noise=bool(lo <= 0.0 <= hi)))
  return out


def markdown(name: str, agg: dict[str, Any], command: str) -> str:
  rm = agg["rm_heldout_accuracy"]
  seeds = ", ".join(str(s) for s in agg["seeds"])
  lines = [
    f"## Start model: {name}",
    "",
    f"`{command}`",
    "",
    f"Seeds {seeds}; {agg['num_eval_prompts']} {agg.get('split', 'validation')} prompts judged "
    "by greedy outputs. Gold "
    "win vs SFT: each prompt's win (ties one half) averaged over the seeds, 95% bootstrap "
    "interval over prompts; per-seed rates beside it. **bold**: the interval excludes 0.5.",
    "",
    f"Reward model held-out pair accuracy (pooled over the seeds' held-out pairs, "
    f"{rm['num_pairs']} pairs): {rm['mean']:.3f} [{rm['ci95'][0]:.3f}, {rm['ci95'][1]:.3f}]; "
    "per seed " + ", ".join(f"{v:.3f}" for v in rm["per_seed"].values()) + ". Label ceiling "
    "(the gold reward's own accuracy on the noisy labels) per seed: "
    + ", ".join(f"{v:.3f}" for v in agg["rm_gold_label_accuracy"].values() if v is not None)
    + ".",
    "",
    "| pairs | loss | gold win vs SFT [95% CI] | per seed | mean gold per seed | #pairs |",
    "|---|---|---|---|---|---|",
  ]
  for cell in agg["cells"].values():
    g = cell["gold_win_vs_sft"]
    text = f"{g['mean'] * 100:.1f}% [{g['ci95'][0] * 100:.1f}, {g['ci95'][1] * 100:.1f}]"
    if not g["ci95"][0] <= 0.5 <= g["ci95"][1]:
      text = f"**{text}**"
    lines.append(
      f"| {cell['source']} | {cell['loss']} | {text} | "
      + ", ".join(f"{v * 100:.1f}%" for v in g["per_seed"].values()) + " | "
      + ", ".join(f"{v:.3f}" for v in cell["mean_gold"].values()) + " | "
      + ", ".join(str(v) for v in cell["num_pairs"].values()) + " |"
    )
  lines += ["", "Orderings (paired difference of per-prompt gold win rates):", ""]
  for o in agg["orderings"]:
    noise = "within noise" if o["within_noise"] else ("holds" if o["diff"] > 0 else "reversed")
    lines.append(f"* {o['a']} − {o['b']}: {o['diff'] * 100:+.1f} points "
                 f"[{o['ci95'][0] * 100:+.1f}, {o['ci95'][1] * 100:+.1f}] ({noise})")
  return "\n".join(lines) + "\n"


def write_effect(path: str, name: str, agg: dict[str, Any], command: str, *,
                 replace: bool = False) -> dict[str, Any]:
  """Merges this start model's entry into ``preference_effect.json`` at ``path`` (keyed by the
  model's name for the test split, ``"<name> (<split>)"`` for another).

  An entry pooled over seeds that ``agg`` lacks is not replaced (running one more seed alone
  would otherwise overwrite a pooled result with that seed's) unless ``replace``.
  """
  doc: dict[str, Any] = {"models": {}}
  if os.path.isfile(path):
    with open(path) as f:
      doc = json.load(f)
  entry = dict(
    model=name,
    command=command,
    split=agg.get("split", "validation"),
    num_eval_prompts=agg["num_eval_prompts"],
    seeds=agg["seeds"],
    rm_heldout_accuracy={k: agg["rm_heldout_accuracy"][k] for k in ("mean", "ci95")},
    cells={
      k: dict(source=c["source"], loss=c["loss"],
              gold_win_vs_sft={kk: c["gold_win_vs_sft"][kk] for kk in ("mean", "ci95")})
      for k, c in agg["cells"].items()
    },
    orderings=agg["orderings"],
  )
  # The test-split entry is the start model's result; a validation entry is kept beside it.
  key = name if entry["split"] == "test" else f"{name} ({entry['split']})"
  old = doc.get("models", {}).get(key)
  lost = sorted(set(old["seeds"]) - set(entry["seeds"])) if old else []
  if lost and not replace:
    every = ",".join(str(x) for x in sorted(set(old["seeds"]) | set(entry["seeds"])))
    raise ValueError(
      f"{path}: the entry {key!r} pools seeds {old['seeds']}; this run has {entry['seeds']} and "
      f"would drop seeds {lost}. Pool them all (--seeds={every} --aggregate_only), write "
      "elsewhere (--out_json=...), or pass --replace_entry.")
  doc.setdefault("models", {})[key] = entry
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(doc, f, indent=2)
  return entry
