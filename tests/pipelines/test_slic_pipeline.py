"""SLiC end to end on a tiny task: MLE checkpoint -> candidates -> calibrate -> evaluate.

A calibrate run from a saved fine-tuned checkpoint must lower the calibration loss and raise
the mean per-input rank correlation between candidate log-likelihood and similarity on its
training candidates, for each decoder family, changing only the model config.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slicjax import checkpoint, optim, scoring
from slicjax.evaluation import metrics, selective
from slicjax.pipelines import calibrate, candidates, evaluate, mle, tasks

FAMILIES = {
  "transformer": dict(family="transformer", preset="tiny", vocab_size=24, max_len=32),
  "ssm": dict(family="ssm", preset="tiny", vocab_size=24, variant="s4d", d_state=8),
  "diffusion": dict(family="diffusion", preset="tiny", vocab_size=24, max_len=32,
                    num_elbo_samples=4),
}


def _config(model, steps=30):
  c = ml_collections.ConfigDict()
  c.model = model
  c.data = {**tasks.DATA_KEYS, "name": "reverse", "input_len": 6, "target_len": 7,
            "synthetic_vocab": 24, "num_train": 64, "num_eval": 16}
  c.optimizer = {**optim.DEFAULTS, "learning_rate": 3e-3, "warmup_steps": 0,
                 "schedule": "constant"}
  c.train = {**mle.TRAIN_KEYS, "steps": steps, "batch_size": 8, "log_every": 10,
             "checkpoint_every": 1000, "progress": False}
  c.candidates = {**candidates.CANDIDATE_KEYS, "num_examples": 32, "num_candidates": 4,
                  "method": "sample", "temperature": 1.0, "top_k": 0, "batch_size": 8,
                  "chunk_size": 16, "similarity": "rouge", "progress": False}
  c.calibrate = {**calibrate.CALIBRATE_KEYS, "loss": "rank", "pairs": "all", "beta": 0.5,
                 "regularizer": "kl", "reg_weight": 0.05, "steps": 40, "batch_size": 8,
                 "log_every": 40, "checkpoint_every": 1000, "progress": False}
  c.evaluate = {**evaluate.EVAL_KEYS, "beam_sizes": (1, 2), "alphas": (0.0,), "num_examples": 8,
                "batch_size": 8, "calibration_candidates": 2, "progress": False}
  c.mesh_shape = (-1, 1, 1)
  return ml_collections.ConfigDict(c.to_dict())


def _mean_corr(model, params, arrays):
  lp = scoring.score_candidates(model, params, jnp.asarray(arrays["inputs"]),
                                jnp.asarray(arrays["candidates"]))["logp"]
  return metrics.rank_correlation(np.asarray(lp), arrays["sim"], arrays["cand_mask"])


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibration_lowers_loss_and_raises_rank_correlation(family, tmp_path):
  cfg = _config(FAMILIES[family])
  if family == "diffusion":  # no next-token logits: the CE regularizer is the -ELBO
    cfg.calibrate.regularizer = "ce"
  mle.run(cfg, str(tmp_path / "mle"))
  cfg.candidates.finetuned_workdir = str(tmp_path / "mle")
  candidates.generate(cfg, str(tmp_path / "cands"))
  rows = candidates.read_candidates(str(tmp_path / "cands"))
  assert len(rows) == 32 and all(len(r["candidates"]) == 4 for r in rows)
  cfg.calibrate.finetuned_workdir = str(tmp_path / "mle")
  cfg.calibrate.candidates_dir = str(tmp_path / "cands")
  calibrate.run(cfg, str(tmp_path / "cal"))
  model = mle.common.model_from(cfg)
  data = tasks.load(cfg, batch_size=8)
  arrays = candidates.to_arrays(rows, data.input_len, data.target_len)
  ft, _ = checkpoint.load_params(str(tmp_path / "mle"))
  cal, step = checkpoint.load_params(str(tmp_path / "cal"))
  assert step == 40
  before, after = _mean_corr(model, ft, arrays), _mean_corr(model, cal, arrays)
  assert after > before + 0.1, (before, after)
  losses = [json.loads(x) for x in open(tmp_path / "cal" / "metrics.jsonl")]
  c = calibrate.calibrate_config(cfg)
  step_fn = calibrate.slic_loss_fn(model, dict(c, pairs="all"))

  class _S:
    ref_params = ft

  batch = {k: jnp.asarray(v) for k, v in arrays.items() if k != "cand_logp"}
  loss_ft = float(step_fn(ft, batch, jax.random.PRNGKey(0), _S)[1]["cal_loss"])
  loss_cal = float(step_fn(cal, batch, jax.random.PRNGKey(0), _S)[1]["cal_loss"])
  assert loss_cal < loss_ft, (loss_ft, loss_cal, losses)
  if family != "transformer":
    return  # evaluation is family-agnostic (diffusion has no beam grid: no left-to-right
    # scores); SSM decoding is checked against teacher forcing in tests/models/test_ssm*.py
  # evaluation writes its table, json and plot
  res = evaluate.run({"fine-tuned": ft, "calibrated": cal}, model, data, cfg,
                     str(tmp_path / "eval"))
  assert {r["beam"] for r in res["grid"]} == {1, 2}
  for f in ("eval.md", "eval.json", "quality_vs_beam.png", "coverage_quality.png"):
    assert os.path.getsize(tmp_path / "eval" / f) > 0
  # selective generation: token-id task, so only the likelihood scores; per-example records
  # recompute the reported areas
  sel = res["selective"]
  assert sel["scores"] == ["logp", "logp_norm"] and "no tokenizer" in sel["skipped"]["calibrated"]["self_eval"]
  recs = [json.loads(x) for x in open(tmp_path / "eval" / "selective.jsonl")]
  assert len(recs) == 2 * 8
  for name in ("fine-tuned", "calibrated"):
    mine = [r for r in recs if r["model"] == name]
    for score in ("logp", "logp_norm"):
      area = selective.curve_area([r[score] for r in mine], [r["rougeL"] for r in mine])
      assert area == pytest.approx(sel["models"][name][score]["area"])
  assert [d["score"] for d in sel["paired_area_differences"]] == ["logp", "logp_norm"]
  assert [(d["model"], d["score"]) for d in sel["score_differences"]] == [
    ("fine-tuned", "logp_norm"), ("calibrated", "logp_norm")]
  again = evaluate.selective_from_records(recs)  # what experiments/selective_report.py does
  for name in ("fine-tuned", "calibrated"):
    assert again["models"][name]["logp"]["area_ci95"] == pytest.approx(
      sel["models"][name]["logp"]["area_ci95"])
  assert "## Selective generation" in open(tmp_path / "eval" / "eval.md").read()


def test_demo_calibration_losses_parse_in_order():
  from slicjax.pipelines import demo

  assert demo.calibration_losses(demo.build_config("smoke")) == ("rank",)
  cfg = demo.build_config("smoke", {"calibrate_losses": "margin, list_rank,expected_reward"})
  assert demo.calibration_losses(cfg) == ("margin", "list_rank", "expected_reward")
