"""Evaluation metrics: repetition, rank correlation, win rate, corpus ROUGE."""

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from slicjax.evaluation import metrics


def test_repetition_rate_hand_values():
  outputs = [
    [5, 6, 7, 5, 6, 7],  # repeats the trigram 5 6 7
    [5, 6, 7, 8, 5, 6],  # repeats the bigram 5 6 only
    [4, 4, 4, 4],  # overlapping: trigram 4 4 4 occurs twice
    [1, 2],  # shorter than n
  ]
  assert metrics.repetition_rate(outputs, 3) == 0.5
  assert metrics.repetition_rate(outputs, 2) == 0.75
  assert metrics.repetition_rate(outputs, 1) == 0.75  # [1, 2] has no repeated token
  assert metrics.repetition_rate([["the", "cat", "the", "cat"]], 2) == 1.0
  with pytest.raises(ValueError, match="no outputs"):
    metrics.repetition_rate([], 3)
  with pytest.raises(ValueError, match="n must"):
    metrics.repetition_rate(outputs, 0)


def test_spearman_hand_values_with_ties():
  assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 0.948683
  assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.948683, abs=1e-6)
  assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


def test_rank_correlation_masks_and_skips_constant_rows():
  logp = np.array(
    [
      [-1.0, -2.0, -2.0, -3.0, 0.0],  # with mask: the tie example above (reversed sign)
      [-1.0, -2.0, -3.0, -4.0, -5.0],  # perfectly anti-calibrated
      [-1.0, -1.0, -1.0, -1.0, -1.0],  # constant logp: skipped
      [-1.0, -2.0, -3.0, -4.0, -5.0],  # one valid candidate: skipped
    ]
  )
  sim = np.array(
    [
      [4.0, 2.0, 3.0, 1.0, -9.0],
      [1.0, 2.0, 3.0, 4.0, 5.0],
      [1.0, 2.0, 3.0, 4.0, 5.0],
      [1.0, 2.0, 3.0, 4.0, 5.0],
    ]
  )
  mask = np.ones_like(logp)
  mask[0, 4] = 0
  mask[3, 1:] = 0
  mean, per = metrics.rank_correlation(logp, sim, mask, return_per_input=True)
  np.testing.assert_allclose(per[:2], [0.948683, -1.0], atol=1e-6)
  assert np.isnan(per[2]) and np.isnan(per[3])
  assert mean == pytest.approx((0.948683 - 1.0) / 2, abs=1e-6)
  # Without the mask the fifth candidate of row 0 changes the answer.
  assert metrics.rank_correlation(logp[:1], sim[:1]) != pytest.approx(0.948683, abs=1e-3)
  assert math.isnan(metrics.rank_correlation(logp[2:3], sim[2:3]))
  with pytest.raises(ValueError, match="shape"):
    metrics.rank_correlation(logp, sim[:, :3], mask)


def test_win_rate_hand_values():
  assert metrics.win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0]) == pytest.approx(0.625)
  assert metrics.win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0], tie=0.0) == 0.5
  assert metrics.win_rate([0.9, 0.2, 0.5, 0.7]) == pytest.approx(0.625)
  with pytest.raises(ValueError, match="shapes"):
    metrics.win_rate([1.0, 2.0], [1.0])


def test_corpus_rouge_matches_rouge_score():
  cands = ["the cat sat on the mat", "a quick brown fox", "hello world"]
  refs = ["the cat is on the mat", "the quick brown dog", "goodbye world"]
  got = metrics.corpus_rouge(cands, refs)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for t in ("rouge1", "rouge2", "rougeL"):
    want = 100 * np.mean([scorer.score(r, c)[t].fmeasure for c, r in zip(cands, refs)])
    assert got[t] == pytest.approx(want, rel=1e-12)
  assert metrics.aggregate_rouge({"rouge1": np.array([0.5, 0.25])}) == {"rouge1": 37.5}
  with pytest.raises(ValueError, match="empty"):
    metrics.corpus_rouge([], [])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_examples():
  rng = np.random.default_rng(1)
  small = rng.normal(10.0, 2.0, 50)
  big = rng.normal(10.0, 2.0, 5000)
  m, lo, hi = metrics.bootstrap_ci(small)
  assert lo < m < hi and m == pytest.approx(small.mean())
  # the percentile interval approximates mean ± 1.96 standard errors
  se = small.std(ddof=1) / np.sqrt(small.size)
  assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
  _, lo2, hi2 = metrics.bootstrap_ci(big)
  assert hi2 - lo2 < (hi - lo) / 5
  with pytest.raises(ValueError, match="no values"):
    metrics.bootstrap_ci([])


def test_paired_bootstrap_sees_a_consistent_small_gain_that_unpaired_intervals_hide():
  rng = np.random.default_rng(2)
  base = rng.normal(20.0, 10.0, 200)  # large per-example spread
  better = base + 0.5 + rng.normal(0.0, 0.2, 200)  # the same examples, a small steady gain
  d, lo, hi = metrics.paired_bootstrap_ci(better, base)
  assert lo > 0 and d == pytest.approx(np.mean(better - base))
  _, blo, bhi = metrics.bootstrap_ci(base)
  _, wlo, whi = metrics.bootstrap_ci(better)
  assert wlo < bhi  # the unpaired intervals overlap
  with pytest.raises(ValueError, match="pair the same examples"):
    metrics.paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_undefined_spearman_is_shown_with_its_reason():
  mean = metrics.rank_correlation(np.zeros((2, 3)), np.array([[1.0, 2, 3], [3, 2, 1]]))
  assert math.isnan(mean)
  assert metrics.format_spearman(mean).startswith("n/a: no input had 2+ distinct")
  assert metrics.format_spearman(0.12345) == "0.123"
  from slicjax.pipelines import evaluate

  table = evaluate.markdown_table([], {"calibrated": mean})
  assert "| calibrated | n/a: no input had" in table
