"""Preference pipeline: RSO / SFT sample-rank pair writing (consistency, resume), preference
training with every loss, stored vs on-the-fly reference log-probs, and the smoke experiment."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from rouge_score import rouge_scorer

from slicjax import scoring
from slicjax.models import reward as reward_models
from slicjax.models.factory import build_model
from slicjax.pipelines import gold_experiment, preference, preference_pairs, rso, tasks
from slicjax.pipelines import reward as reward_lib

VOCAB, S, L = 12, 4, 6
MODEL = dict(
  family="transformer",
  preset="tiny",
  vocab_size=VOCAB,  # the policy emits task ids only; the ranker below adds 5 reserved ids
  max_len=32,
  d_model=32,
  d_ff=64,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)
STEPS = 15


def _config(**sections):
  c = dict(
    model=MODEL,
    data=dict(
      name="reverse", synthetic_vocab=VOCAB, input_len=S, target_len=L, num_train=64, num_eval=16
    ),
    rso=dict(
      reward="gold",
      mode="rso",
      num_examples=24,
      num_samples=6,
      num_accept=4,
      beta=0.5,
      batch_size=8,
      chunk_size=8,
      temperature=1.0,
      top_k=0,
      progress=False,
    ),
    preference=dict(steps=STEPS, batch_size=8, beta=0.5, gamma=0.5, log_every=1, progress=False),
    optimizer=dict(learning_rate=3e-3, warmup_steps=0, schedule="constant"),
    mesh_shape=(-1, 1, 1),
  )
  for k, v in sections.items():
    c[k] = {**c.get(k, {}), **v}
  return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def setup():
  cfg = _config()
  data = tasks.load(cfg, batch_size=8)
  model = build_model(MODEL)
  params = nn.unbox(jax.jit(model.init_fn(input_len=S, target_len=L))(jax.random.PRNGKey(0)))
  return cfg, data, model, params["params"]


@pytest.fixture(scope="module")
def rso_dir(setup, tmp_path_factory):
  cfg, data, model, params = setup
  out = str(tmp_path_factory.mktemp("rso"))
  rso.rso_sample(cfg, out, params=params, model=model, data=data)
  return out


def _gold(cand_text, ref_text):
  s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(
    ref_text, cand_text
  )
  return np.mean([s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")])


def test_rso_pairs_are_consistent(setup, rso_dir):
  cfg, data, model, params = setup
  rows = preference_pairs.read_rows(rso_dir)
  assert [r["index"] for r in rows] == list(range(24))
  assert sorted(f for f in os.listdir(rso_dir) if f.startswith("chunk")) == [
    "chunk-00000.jsonl",
    "chunk-00001.jsonl",
    "chunk-00002.jsonl",
  ]
  score = jax.jit(lambda p, b: scoring.score_targets(model, p, b)["logp"])
  n_pairs = 0
  for r in rows:
    assert r["source"] == "rso-sample-rank" and r["num_accepted"] <= 4
    assert 0.0 < r["expected_acceptance"] <= 1.0
    if r["accepted_rewards"]:  # SLiC-HF's best-ranked y_ref: the highest-reward accepted sample
      np.testing.assert_allclose(_gold(data.detokenize(r["best"]), r["target_text"]),
                                 max(r["accepted_rewards"]), atol=1e-6)
    assert len(r["pairs"]) + r["num_ties"] == max(r["num_unique"] - 1, 0)  # tournament: u - 1
    for p in r["pairs"]:
      n_pairs += 1
      assert p["chosen"] != p["rejected"]
      assert p["chosen_reward"] > p["rejected_reward"]  # the gold judge's winner is chosen
      np.testing.assert_allclose(
        p["chosen_reward"], _gold(p["chosen_text"], r["target_text"]), atol=1e-6
      )
      batch = preference_pairs.pairs_to_arrays(
        [
          dict(
            prompt=r["prompt"],
            chosen=p["chosen"],
            rejected=p["rejected"],
            target=p["chosen"],
            index=0,
          )
        ],
        S,
        L,
      )
      ref = score(params, {"inputs": batch["inputs"], "targets": batch["chosen"]})
      np.testing.assert_allclose(p["ref_chosen_logp"], float(ref[0]), rtol=1e-4, atol=1e-4)
  assert n_pairs >= 24  # random policy: nearly every prompt has >= 2 distinct samples
  summary = json.load(open(os.path.join(rso_dir, "summary.json")))
  assert summary["pairs"] == n_pairs and 0 < summary["expected_acceptance"] <= 1


def test_rso_sample_resumes_after_a_lost_chunk(setup, rso_dir, tmp_path):
  cfg, data, model, params = setup
  out = str(tmp_path / "copy")
  os.makedirs(out)
  for name in os.listdir(rso_dir):
    with open(os.path.join(rso_dir, name), "rb") as f, open(os.path.join(out, name), "wb") as g:
      g.write(f.read())
  original = open(os.path.join(rso_dir, "chunk-00001.jsonl")).read()
  os.remove(os.path.join(out, "chunk-00001.jsonl"))  # killed while writing chunk 1
  stamp = os.path.getmtime(os.path.join(out, "chunk-00000.jsonl"))
  with pytest.raises(ValueError, match="gaps"):
    preference_pairs.read_rows(out)
  rso.rso_sample(cfg, out, params=params, model=model, data=data)
  assert open(os.path.join(out, "chunk-00001.jsonl")).read() == original
  assert os.path.getmtime(os.path.join(out, "chunk-00000.jsonl")) == stamp  # not rewritten


def test_sft_sample_rank_and_ranker_labels(setup, tmp_path):
  cfg, data, model, params = setup
  fmt = reward_models.PairFormat.reserved(VOCAB)
  ranker = reward_models.PairwiseRanker(build_model(dict(MODEL, vocab_size=VOCAB + 5)), fmt)
  rparams = ranker.init(jax.random.PRNGKey(7), input_len=fmt.input_len(S, L))
  loaded = reward_lib.LoadedReward("ranker", ranker, rparams)
  c = _config(rso=dict(reward="model", mode="sft", num_examples=8))
  out = str(tmp_path / "sft")
  rso.rso_sample(c, out, params=params, model=model, data=data, reward=loaded)
  rows = preference_pairs.read_rows(out)
  assert {r["source"] for r in rows} == {"sft-sample-rank"}
  chosen, rejected, prompts = [], [], []
  for r in rows:
    assert r["expected_acceptance"] is None
    assert r["num_accepted"] == min(4, r["num_valid"])
    for p in r["pairs"]:
      chosen.append(p["chosen"])
      rejected.append(p["rejected"])
      prompts.append(r["prompt"])
  assert chosen
  pairs = [
    dict(prompt=x, chosen=w, rejected=lose, target=w, index=0)
    for x, w, lose in zip(prompts, chosen, rejected)
  ]
  arr = preference_pairs.pairs_to_arrays(pairs, S, L)
  # The ranker's pointwise reward logit ρ(x, y, y_b): the default baseline is the first sample.
  cands = np.stack([arr["chosen"], arr["rejected"]], axis=1)
  default = loaded.candidate_rewards(arr["inputs"], cands)
  np.testing.assert_allclose(default, loaded.candidate_rewards(arr["inputs"], cands,
                                                               arr["chosen"]), rtol=1e-6)
  other = loaded.candidate_rewards(arr["inputs"], cands, arr["rejected"])
  assert not np.allclose(default, other)
  # Every pair's chosen completion wins the ranker's (symmetrized) comparison.
  assert (loaded.win_prob(arr["inputs"], arr["chosen"], arr["rejected"]) > 0.5).all()


@pytest.mark.parametrize("loss", ["sigmoid_norm", "hinge", "hinge_norm", "ipo", "ipo_seq",
                                  "slic_hf"])
def test_train_preference_each_loss_learns_its_pairs(setup, rso_dir, tmp_path, loss):
  cfg, data, model, params = setup
  extra = dict(beta=0.05) if loss == "ipo_seq" else {}  # sequence-level target 1/(2β) = 10 nats
  c = _config(preference=dict(loss=loss, pair_source="rso-sample-rank", pairs=rso_dir, **extra))
  _, summary = preference.train_preference(c, str(tmp_path), params=params, model=model, data=data)
  before, after = summary["before"], summary["after"]
  assert summary["num_pairs"] >= 24
  assert after["dpo_loss"] < before["dpo_loss"] - 0.02, summary
  assert after["accuracy"] > 0.75, summary
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert len(lines) == STEPS  # logged every step
  for key in ("chosen_reward", "rejected_reward", "margin", "accuracy", "policy_accuracy"):
    assert key in lines[0]


def test_stored_and_on_the_fly_reference_give_the_same_loss(setup, rso_dir, tmp_path):
  cfg, data, model, params = setup
  # From step 2 on the policy differs from the reference, so equal losses need equal reference
  # log-probs: read from the pairs (computed once at sampling time) or scored in every step.
  logs = {}
  for mode in ("stored", "on_the_fly"):
    c = _config(
      preference=dict(
        loss="sigmoid_norm", pair_source="rso-sample-rank", pairs=rso_dir, ref_logp=mode
      )
    )
    preference.train_preference(c, str(tmp_path / mode), params=params, model=model, data=data)
    logs[mode] = [json.loads(x) for x in open(tmp_path / mode / "metrics.jsonl")]
  for key in ("loss", "margin", "chosen_reward"):
    np.testing.assert_allclose(
      [x[key] for x in logs["stored"]], [x[key] for x in logs["on_the_fly"]], rtol=1e-3, atol=1e-4
    )
  assert abs(logs["stored"][-1]["loss"] - np.log(2.0)) > 0.05  # the policy did move


def test_bad_preference_config_raises(setup, rso_dir, tmp_path):
  cfg, data, model, params = setup
  with pytest.raises(ValueError, match="choose from"):
    preference.preference_config(_config(preference=dict(loss="kto")))
  c = _config(preference=dict(pair_source="direct", pairs=rso_dir))
  with pytest.raises(ValueError, match="pair_source"):
    preference.train_preference(c, str(tmp_path), params=params, model=model, data=data)


def test_extreme_pair_picks_gold_best_and_worst_valid_samples():
  gold = np.array([0.3, 0.9, 0.1, 0.95], np.float32)
  assert gold_experiment.extreme_pair(gold, np.array([1, 1, 1, 0], bool)) == (1, 2)
  assert gold_experiment.extreme_pair(gold, np.array([1, 1, 1, 1], bool)) == (3, 2)
  assert gold_experiment.extreme_pair(gold, np.array([0, 0, 1, 0], bool)) is None
  # All gold rewards equal: the first two valid samples (a pair with a random label).
  assert gold_experiment.extreme_pair(np.zeros(3), np.array([0, 1, 1], bool)) == (1, 2)


@pytest.mark.slow
def test_synthetic_gold_experiment_smoke(tmp_path):
  overrides = {
      "train.steps": 30,
      "human.policy_steps": 10,
      "human.num_samples": 3,
      "reward.steps": 20,
      "reward.eval_every": 10,
      "preference.steps": 8,
      "experiment.losses": ("sigmoid_norm",),
      "rso.num_examples": 32,
      "human.num_prompts": 64,
      "train.progress": False,
      "reward.progress": False,
      "preference.progress": False,
      "rso.progress": False,
  }
  out = gold_experiment.synthetic_gold_experiment(overrides, str(tmp_path), preset="smoke")
  names = [r["policy"] for r in out["rows"]]
  assert names == [
    "SFT",
    "direct/sigmoid_norm",
    "sft-sample-rank/sigmoid_norm",
    "rso-sample-rank/sigmoid_norm",
  ]
  sft = out["rows"][0]
  assert sft["proxy_win_vs_sft"] == 0.5 and sft["gold_win_vs_sft"] == 0.5  # all ties
  for r in out["rows"]:
    assert 0.0 <= r["proxy_win_vs_target"] <= 1.0 and 0.0 <= r["mean_gold"] <= 1.0
  assert 0 < out["acceptance"]["rso-sample-rank"]["expected_acceptance"] <= 1
  text = open(out["report"]).read()
  assert "| rso-sample-rank | sigmoid_norm |" in text and "held-out pair accuracy" in text
  # Per-example outputs recompute every policy's gold win rate against SFT.
  recs = [json.loads(x) for x in open(os.path.join(str(tmp_path), "eval_outputs.jsonl"))]
  for r in out["rows"]:
    mine = [x["gold_win_vs_sft"] for x in recs if x["policy"] == r["policy"]]
    assert len(mine) == 32 and np.mean(mine) == pytest.approx(r["gold_win_vs_sft"])
    lo, hi = r["gold_win_vs_sft_ci95"]
    assert lo <= r["gold_win_vs_sft"] <= hi
  rm = out["reward"]
  assert rm["select_pairs"] > 0 and rm["selected_step"] in (10, 20)
  assert rm["heldout_accuracy_ci95"][0] <= rm["heldout_accuracy"] <= rm["heldout_accuracy_ci95"][1]
  assert "gold_label_accuracy" in rm and "[95% CI" in text
  # Rerun in the same workdir, reward stage only: the SFT stage, its early snapshot, the pairs
  # and the reward model are reused, so the reward report is the same.
  again = gold_experiment.synthetic_gold_experiment(
    overrides, str(tmp_path), preset="smoke", reward_only=True
  )
  assert again["rows"] == [] and again["report"].endswith("reward_report.md")
  for k in ("heldout_accuracy", "train_accuracy", "selected_step", "gold_order_accuracy"):
    assert again["reward"].get(k) == rm.get(k), k


def test_clean_completions_cuts_after_eos_and_drops_out_of_vocabulary():
  tokens = np.array([[[5, 6, 1, 7, 8], [5, 13, 6, 1, 0], [4, 4, 4, 4, 4]]])
  got = rso.clean_completions(tokens, 4, vocab_size=VOCAB)
  np.testing.assert_array_equal(got, [[[5, 6, 1, 0], [0, 0, 0, 0], [4, 4, 4, 4]]])
  np.testing.assert_array_equal(rso.clean_completions(tokens[:, :1, :2], 3), [[[5, 6, 0]]])


def test_dpo_runs_on_a_diffusion_policy_with_only_the_model_config_changed(rso_dir, tmp_path):
  # The same pairs (token ids) and the same train_preference call; only model.family differs.
  # Log-likelihoods are ELBO estimates with masks shared between policy and reference.
  model_cfg = dict(MODEL, family="diffusion")
  c = _config(
    model=model_cfg,
    preference=dict(loss="sigmoid_norm", pair_source="rso-sample-rank", pairs=rso_dir,
                    ref_logp="on_the_fly"),
  )
  data = tasks.load(c, batch_size=8)
  model = build_model(model_cfg)
  assert model.family == "diffusion"
  params = nn.unbox(jax.jit(model.init_fn(input_len=S, target_len=L))(jax.random.PRNGKey(0)))
  _, summary = preference.train_preference(
    c, str(tmp_path), params=params["params"], model=model, data=data
  )
  before, after = summary["before"], summary["after"]
  assert summary["num_pairs"] >= 24
  assert after["dpo_loss"] < before["dpo_loss"] - 0.02, summary
  assert after["accuracy"] > before["accuracy"], summary


def test_rso_recipe_scales_and_slic_hf_targets():
  c = preference.preference_config(_config(preference=dict(loss="sigmoid_norm", beta=0.1,
                                                           gamma=0.05)))
  pw, pl, rw, rl = (jnp.array([x]) for x in (-3.0, -5.0, -4.0, -4.5))  # h = 1 - (-0.5) = 1.5
  one = jnp.array([1.0])
  got = preference.pair_loss(c, pw, pl, rw, rl, one, one)
  np.testing.assert_allclose(got, -np.log(1 / (1 + np.exp(-0.05 * 1.5))), rtol=1e-6)  # γ
  got = preference.pair_loss(dict(c, loss="dpo"), pw, pl, rw, rl, one, one)
  np.testing.assert_allclose(got, -np.log(1 / (1 + np.exp(-0.1 * 1.5))), rtol=1e-6)  # β
  pairs = [dict(index=0, target=[5, 1], best=[7, 1]), dict(index=1, target=[6, 1], best=[8, 1])]
  slic = dict(c, loss="slic_hf", slic_hf_target="best_ranked")
  assert [p["target"] for p in preference.slic_hf_targets(pairs, slic)] == [[7, 1], [8, 1]]
  assert preference.slic_hf_targets(pairs, dict(slic, slic_hf_target="target")) is pairs
  with pytest.raises(ValueError, match="1 pair\\(s\\) have none \\(first: prompt 1\\)"):
    preference.slic_hf_targets([pairs[0], dict(pairs[1], best=None)], slic)
  with pytest.raises(ValueError, match="slic_hf_target='best'"):
    preference.preference_config(_config(preference=dict(slic_hf_target="best")))
