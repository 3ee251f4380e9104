"""Pooling the synthetic-gold experiment over seeds (slicjax.pipelines.preference_study) on
hand-made seed directories, with values computable by hand."""

import json
import os

import numpy as np
import pytest

from slicjax.pipelines import preference_study

POLICIES = ("SFT", "direct/sigmoid_norm", "sft-sample-rank/sigmoid_norm",
            "rso-sample-rank/sigmoid_norm")


def _seed_dir(root, seed, wins, correct, gold_label=0.9, sfx=""):
  """``wins[policy]``: per-prompt gold wins vs SFT; ``correct``: held-out pair correctness;
  ``sfx``: ``_test`` for a test-split evaluation."""
  d = os.path.join(root, f"seed_{seed}")
  os.makedirs(os.path.join(d, "reward"), exist_ok=True)
  rows = []
  for p in POLICIES:
    source, loss = ("SFT", "-") if p == "SFT" else p.split("/")
    rows.append(dict(policy=p, source=source, loss=loss, gold_win_vs_sft=float(np.mean(wins[p])),
                     mean_gold=0.1, mean_length=20.0, proxy_win_vs_sft=0.5, num_pairs=10))
  with open(os.path.join(d, f"results{sfx}.json"), "w") as f:
    json.dump(dict(rows=rows), f)
  with open(os.path.join(d, "reward", "reward_eval.json"), "w") as f:
    json.dump(dict(heldout_accuracy=float(np.mean(correct)), heldout_correct=correct,
                   gold_label_accuracy=gold_label), f)
  with open(os.path.join(d, f"eval_outputs{sfx}.jsonl"), "w") as f:
    for p in POLICIES:
      for i, w in enumerate(wins[p]):
        f.write(json.dumps(dict(policy=p, example=i, gold_win_vs_sft=w)) + "\n")
  return d


def test_aggregate_pools_prompts_over_seeds(tmp_path):
  sft = [0.5] * 4
  s0 = dict(zip(POLICIES, (sft, [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0.5])))
  s1 = dict(zip(POLICIES, (sft, [0, 0, 0, 0], [1, 1, 0.5, 0], [1, 1, 1, 1])))
  dirs = {0: _seed_dir(tmp_path, 0, s0, [1, 1, 0]), 1: _seed_dir(tmp_path, 1, s1, [1, 0])}
  agg = preference_study.aggregate(dirs, resamples=2000)
  assert agg["seeds"] == [0, 1] and agg["num_eval_prompts"] == 4
  # Pooled held-out pairs: 3 of 5 correct; per seed 2/3 and 1/2.
  rm = agg["rm_heldout_accuracy"]
  assert rm["mean"] == pytest.approx(0.6) and rm["num_pairs"] == 5
  assert rm["per_seed"] == {"0": pytest.approx(2 / 3), "1": pytest.approx(0.5)}
  # rso: per-prompt means over seeds 1, 1, 1, 0.75 -> 0.9375; every resample is >= 0.75.
  rso = agg["cells"]["rso-sample-rank/sigmoid_norm"]["gold_win_vs_sft"]
  assert rso["mean"] == pytest.approx(0.9375) and rso["ci95"][0] >= 0.75 - 1e-9
  assert rso["per_seed"] == {"0": pytest.approx(0.875), "1": pytest.approx(1.0)}
  direct = agg["cells"]["direct/sigmoid_norm"]["gold_win_vs_sft"]
  assert direct["mean"] == pytest.approx(0.125)
  # Orderings are paired per-prompt differences: rso − sft-sample-rank = mean of
  # (1 − 1, 1 − 1, 1 − 0.25, 0.75 − 0) = 0.375.
  o = {(x["a"].split("/")[0], x["b"].split("/")[0]): x for x in agg["orderings"]}
  assert o[("rso-sample-rank", "sft-sample-rank")]["diff"] == pytest.approx(0.375)
  # sft-sample-rank (1, 1, 0.25, 0) − direct (0.5, 0, 0, 0) = 1.75 / 4
  assert o[("sft-sample-rank", "direct")]["diff"] == pytest.approx(0.4375)
  assert not o[("rso-sample-rank", "direct")]["within_noise"]  # 0.8125, every resample > 0
  text = preference_study.markdown("tiny", agg, "cmd")
  assert "| rso-sample-rank | sigmoid_norm | **93.8% [" in text and "0.600 [" in text
  # The effect file keeps one entry per start model and merges later ones in.
  path = str(tmp_path / "effect.json")
  preference_study.write_effect(path, "a", agg, "cmd a")
  preference_study.write_effect(path, "b", agg, "cmd b")
  doc = json.load(open(path))
  assert sorted(doc["models"]) == ["a (validation)", "b (validation)"]
  assert doc["models"]["b (validation)"]["command"] == "cmd b"
  assert doc["models"]["a (validation)"]["rm_heldout_accuracy"]["mean"] == pytest.approx(0.6)
  # A test-split evaluation reads the *_test files and is the model's main entry.
  flipped = {p: [1 - w for w in v] for p, v in s0.items()}
  _seed_dir(tmp_path, 0, flipped, [1, 1, 0], sfx="_test")
  _seed_dir(tmp_path, 1, flipped, [1, 0], sfx="_test")
  test = preference_study.aggregate(dirs, resamples=200, split="test")
  assert test["split"] == "test"
  assert test["cells"]["direct/sigmoid_norm"]["gold_win_vs_sft"]["mean"] == pytest.approx(0.75)
  preference_study.write_effect(path, "a", test, "cmd test")
  assert json.load(open(path))["models"]["a"]["split"] == "test"
  # One seed run alone does not overwrite the entry pooled over seeds 0 and 1.
  alone = preference_study.aggregate({1: dirs[1]}, resamples=200, split="test")
  with pytest.raises(ValueError, match=r"would drop seeds \[0\]. Pool them all \(--seeds=0,1"):
    preference_study.write_effect(path, "a", alone, "cmd seed 1")
  assert json.load(open(path))["models"]["a"]["command"] == "cmd test"  # untouched
  preference_study.write_effect(path, "a", alone, "cmd seed 1", replace=True)
  assert json.load(open(path))["models"]["a"]["seeds"] == [1]


def test_aggregate_refuses_missing_or_mismatched_seeds(tmp_path):
  s = dict(zip(POLICIES, ([0.5] * 3, [1, 0, 0], [1, 1, 0], [1, 1, 1])))
  d0 = _seed_dir(tmp_path, 0, s, [1])
  with pytest.raises(ValueError, match="has no results.json: run the seed first"):
    preference_study.aggregate({0: d0, 1: str(tmp_path / "seed_1")})
  s4 = dict(zip(POLICIES, ([0.5] * 4, [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1])))
  d1 = _seed_dir(tmp_path, 1, s4, [1])
  with pytest.raises(ValueError, match="judged other prompts"):
    preference_study.aggregate({0: d0, 1: d1})
  assert preference_study.seed_overrides({"a.b": 1}, 7) == {
    "a.b": 1, **{k: 7 for k in preference_study.SEED_KEYS}}
