"""Selective generation: how fast quality rises when a generator abstains on its least confident
outputs (host-side, numpy).

Given one confidence score and one quality value per output:

* :func:`coverage_quality_curve` — mean quality of the ``k`` most confident outputs, for
  ``k = 1..n`` (coverage ``k / n``);
* :func:`curve_area` — its area: the mean of the curve over the ``n`` coverage points (the
  overall mean quality for an uninformative score, higher for a useful one);
* :func:`auroc_above_median` — how well the score separates outputs whose quality is above the
  median from the rest (0.5 = no signal, 1 = perfect);
* :func:`selective_summary` — both, with 95% bootstrap intervals over examples; and
  :func:`paired_area_difference` for two models or two scores on the same examples.

Ties in the confidence score are broken at random in expectation: inside a group of equal
scores, the curve counts every member's quality by the group's mean, so the result does not
depend on the order the outputs came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UNDEFINED_AUROC = "n/a: every output is on the same side of the median quality"


def _check(confidence, quality) -> tuple[np.ndarray, np.ndarray]:
  c = np.asarray(confidence, np.float64).reshape(-1)
  q = np.asarray(quality, np.float64).reshape(-1)
  if c.shape != q.shape:
    raise ValueError(
      f"selective metrics: {c.size} confidence scores for {q.size} quality values; give one "
      "of each per output, in the same order."
    )
  if c.size == 0:
    raise ValueError("selective metrics: no outputs; evaluate at least one example.")
  bad = ~np.isfinite(c)
  if bad.any():
    raise ValueError(
      f"selective metrics: confidence score of output {int(np.argmax(bad))} is {c[bad][0]}; "
      "confidence scores must be finite (check the scored candidates are non-empty)."
    )
  if not np.isfinite(q).all():
    raise ValueError("selective metrics: a quality value is not finite.")
  return c, q


def coverage_quality_curve(confidence: Sequence[float], quality: Sequence[float]):
  """``(coverage, mean_quality)``, each ``[n]``: keeping the ``k`` most confident outputs
  (coverage ``k / n``), their mean quality — with ties in ``confidence`` taken at their
  group's mean quality (the expectation over random tie-breaking).

  Raises:
    ValueError: empty input, mismatched lengths, or a non-finite value.
  """
  c, q = _check(confidence, quality)
  n = c.size
  order = np.argsort(-c, kind="stable")
  c_sorted, q_sorted = c[order], q[order]
  # Replace each tie group's qualities by the group mean.
  starts = np.flatnonzero(np.r_[True, c_sorted[1:] != c_sorted[:-1]])
  sums = np.add.reduceat(q_sorted, starts)
  sizes = np.diff(np.r_[starts, n])
  q_tied = np.repeat(sums / sizes, sizes)
  k = np.arange(1, n + 1, dtype=np.float64)
  return k / n, np.cumsum(q_tied) / k


def curve_area(confidence: Sequence[float], quality: Sequence[float]) -> float:
  """Area under the coverage-quality curve: its mean over the coverage points ``1/n .. 1``."""
  return float(np.mean(coverage_quality_curve(confidence, quality)[1]))


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n, ties sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  sizes = np.diff(np.r_[starts, x.size])
  mean_rank = starts + (sizes + 1) / 2.0
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(mean_rank, sizes)
  return ranks


def auroc(confidence: Sequence[float], labels: Sequence[bool]) -> float:
  """Probability that a random positive outscores a random negative (ties count half);
  ``nan`` when all labels are equal."""
  c = np.asarray(confidence, np.float64).reshape(-1)
  y = np.asarray(labels, bool).reshape(-1)
  if c.shape != y.shape:
    raise ValueError(f"auroc: {c.size} scores for {y.size} labels.")
  pos, neg = int(y.sum()), int((~y).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  r = _ranks(c)
  return float((r[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def auroc_above_median(confidence: Sequence[float], quality: Sequence[float]) -> float:
  """AUROC of ``confidence`` for "quality is above the median quality" (``nan`` when no
  output is, or every output is, above it)."""
  c, q = _check(confidence, quality)
  return auroc(c, q > np.median(q))


def format_auroc(value: float) -> str:
  return UNDEFINED_AUROC if value is None or np.isnan(value) else f"{value:.3f}"


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
  tail = (1.0 - level) / 2.0 * 100.0
  ok = stats[~np.isnan(stats)]
  if ok.size == 0:
    return float("nan"), float("nan")
  lo, hi = np.percentile(ok, [tail, 100.0 - tail])
  return float(lo), float(hi)


def _resample_index(n: int, num_resamples: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def selective_summary(
  confidence: Sequence[float], quality: Sequence[float], *, num_resamples: int = 1000,
  level: float = 0.95, seed: int = 0, curve_points: int = 101,
) -> dict[str, Any]:
  """Area and AUROC of one confidence score, with percentile bootstrap intervals over examples.

  Returns:
    ``{"area", "area_ci95": [lo, hi], "auroc", "auroc_ci95": [lo, hi], "mean_quality",
    "oracle_area", "n", "curve": {"coverage": [...], "quality": [...]}}`` — the curve kept at
    up to ``curve_points`` evenly spaced coverages; ``oracle_area`` ranks by the quality itself
    (the best any score can do). AUROC entries are ``nan`` where undefined.
  """
  c, q = _check(confidence, quality)
  idx = _resample_index(c.size, num_resamples, seed)
  areas = np.array([curve_area(c[i], q[i]) for i in idx])
  aurocs = np.array([auroc_above_median(c[i], q[i]) for i in idx])
  cov, qual = coverage_quality_curve(c, q)
  keep = np.unique(np.linspace(0, c.size - 1, min(curve_points, c.size)).round().astype(int))
  return dict(
    area=curve_area(c, q), area_ci95=list(_interval(areas, level)),
    auroc=auroc_above_median(c, q), auroc_ci95=list(_interval(aurocs, level)),
    mean_quality=float(q.mean()), oracle_area=curve_area(q, q), n=int(c.size),
    curve=dict(coverage=cov[keep].tolist(), quality=qual[keep].tolist()),
  )


def paired_area_difference(
  confidence_a, quality_a, confidence_b, quality_b, *, num_resamples: int = 1000,
  level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
  """``area(a) - area(b)`` on the same examples (same order), with a paired bootstrap interval
  (one resample of examples applied to both); ``within_noise`` when the interval holds 0."""
  ca, qa = _check(confidence_a, quality_a)
  cb, qb = _check(confidence_b, quality_b)
  if ca.size != cb.size:
    raise ValueError(
      f"paired_area_difference: {ca.size} vs {cb.size} outputs; pair the same examples."
    )
  idx = _resample_index(ca.size, num_resamples, seed)
  diffs = np.array([curve_area(ca[i], qa[i]) - curve_area(cb[i], qb[i]) for i in idx])
  lo, hi = _interval(diffs, level)
  d = curve_area(ca, qa) - curve_area(cb, qb)
  return dict(diff=d, ci95=[lo, hi], within_noise=bool(lo <= 0.0 <= hi))
