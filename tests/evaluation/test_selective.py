"""Selective-generation metrics against hand-computed cases: ties, all-equal scores, one
example, AUROC with ties, and the bootstrap intervals around them."""

import numpy as np
import pytest

from slicjax.evaluation import selective


def test_curve_area_and_auroc_by_hand_with_a_tie():
  # sorted by confidence: 0.9 (q=1), {0.5: q=1, q=0} tied, 0.1 (q=0)
  cov, qual = selective.coverage_quality_curve([0.9, 0.1, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(qual, [1.0, 0.75, 2.0 / 3.0, 0.5])  # the tie counts its mean 0.5
  assert selective.curve_area([0.9, 0.1, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(
    (1.0 + 0.75 + 2.0 / 3.0 + 0.5) / 4
  )
  # positives {0.9, 0.5} vs negatives {0.1, 0.5}: 3 wins and one tie (half) of 4 pairs
  assert selective.auroc_above_median([0.9, 0.1, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.875)


def test_ties_do_not_depend_on_input_order():
  c, q = [0.3, 0.3, 0.3, 0.8, 0.1], [0.0, 1.0, 0.5, 0.2, 0.9]
  a = selective.coverage_quality_curve(c, q)[1]
  perm = [4, 2, 0, 3, 1]
  b = selective.coverage_quality_curve(np.take(c, perm), np.take(q, perm))[1]
  np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(a, [0.2, (0.2 + 0.5) / 2, (0.2 + 1.0) / 3, (0.2 + 1.5) / 4,
                                 (0.2 + 1.5 + 0.9) / 5])


def test_all_equal_scores_give_the_flat_random_curve():
  q = [0.1, 0.7, 0.4, 0.0]
  _, qual = selective.coverage_quality_curve([2.0] * 4, q)
  np.testing.assert_allclose(qual, [np.mean(q)] * 4)
  assert selective.curve_area([2.0] * 4, q) == pytest.approx(np.mean(q))
  assert selective.auroc_above_median([2.0] * 4, q) == pytest.approx(0.5)


def test_one_example_and_undefined_auroc():
  cov, qual = selective.coverage_quality_curve([-3.0], [0.4])
  assert cov.tolist() == [1.0] and qual.tolist() == [0.4]
  assert np.isnan(selective.auroc_above_median([-3.0], [0.4]))
  assert np.isnan(selective.auroc_above_median([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))
  s = selective.selective_summary([-3.0], [0.4], num_resamples=50)
  assert s["area"] == pytest.approx(0.4) and s["area_ci95"] == [pytest.approx(0.4)] * 2
  assert np.isnan(s["auroc"]) and selective.format_auroc(s["auroc"]).startswith("n/a")


def test_oracle_and_perfect_scores():
  rng = np.random.default_rng(0)
  q = rng.random(50)
  s = selective.selective_summary(q * 3 + 1, q, num_resamples=200)
  assert s["area"] == pytest.approx(s["oracle_area"])
  assert s["auroc"] == pytest.approx(1.0)
  inv = selective.selective_summary(-q, q, num_resamples=200)
  assert inv["area"] < inv["mean_quality"] < s["area"]
  assert inv["auroc"] == pytest.approx(0.0)


def test_summary_interval_and_paired_difference():
  rng = np.random.default_rng(1)
  q = rng.random(300)
  good = q + rng.normal(0, 0.3, 300)  # informative
  noise = rng.normal(0, 1, 300)  # uninformative
  s = selective.selective_summary(good, q)
  lo, hi = s["area_ci95"]
  assert lo <= s["area"] <= hi and hi - lo < 0.15
  assert s["curve"]["coverage"][0] == pytest.approx(1 / 300) and s["curve"]["coverage"][-1] == 1
  assert len(s["curve"]["coverage"]) == 101
  d = selective.paired_area_difference(good, q, noise, q)
  assert d["ci95"][0] > 0 and not d["within_noise"]
  same = selective.paired_area_difference(good, q, good, q)
  assert same["diff"] == 0 and same["within_noise"]


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="3 confidence scores for 2 quality values"):
    selective.curve_area([1, 2, 3], [0, 1])
  with pytest.raises(ValueError, match="output 1 is nan"):
    selective.curve_area([1, float("nan")], [0, 1])
  with pytest.raises(ValueError, match="no outputs"):
    selective.curve_area([], [])
  with pytest.raises(ValueError, match="pair the same examples"):
    selective.paired_area_difference([1, 2], [0, 1], [1], [0])


def test_selective_report_binary_rebuilds_the_report_from_records(tmp_path):
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  rng = np.random.default_rng(3)
  rows = []
  for model, noise in (("fine-tuned", 1.0), ("calibrated", 0.2)):
    q = rng.random(40) * 50
    for i in range(40):
      rows.append(dict(id=i, model=model, beam=4, alpha=0.0, rougeL=float(q[i]),
                       logp=float(q[i] / 50 + rng.normal(0, noise)), logp_norm=float(-i)))
  path = tmp_path / "selective.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = subprocess.run(
    [sys.executable, os.path.join(root, "experiments", "selective_report.py"),
     f"--selective_jsonl={path}", f"--out_dir={tmp_path / 'out'}"],
    capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rep = json.loads((tmp_path / "out" / "selective.json").read_text())
  for model in ("fine-tuned", "calibrated"):
    mine = [r for r in rows if r["model"] == model]
    assert rep["models"][model]["logp"]["area"] == pytest.approx(
      selective.curve_area([r["logp"] for r in mine], [r["rougeL"] for r in mine]))
  assert rep["paired_area_differences"][0]["model"] == "calibrated"
  assert (tmp_path / "out" / "coverage_quality.png").stat().st_size > 0
  assert "## Selective generation" in (tmp_path / "out" / "selective.md").read_text()
