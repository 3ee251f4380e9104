"""Evaluation metrics on decoded outputs and candidate scores (host-side, numpy).

* :func:`repetition_rate` — share of outputs that repeat an n-gram;
* :func:`rank_correlation` — per-input Spearman correlation between the model's candidate
  log-likelihoods and the candidates' quality (how calibrated the likelihood is);
* :func:`win_rate` — share of comparisons the policy wins against a baseline;
* :func:`corpus_rouge` / :func:`aggregate_rouge` — corpus ROUGE as mean F-measure × 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slicjax import similarity


def has_repeated_ngram(tokens: Sequence, n: int) -> bool:
  """True if some n-gram occurs at least twice in ``tokens`` (occurrences may overlap)."""
  seen = set()
  for i in range(len(tokens) - n + 1):
    gram = tuple(tokens[i : i + n])
    if gram in seen:
      return True
    seen.add(gram)
  return False


def repetition_rate(token_lists: Sequence[Sequence], n: int = 3) -> float:
  """Fraction of outputs containing a repeated n-gram.

  An output *contains a repeated n-gram* if some sequence of ``n`` consecutive tokens occurs
  at least twice in it (overlapping occurrences count: ``a a a`` repeats the bigram ``a a``).
  Outputs shorter than ``n + 1`` tokens cannot repeat. Pass tokens without padding, BOS or EOS
  (padding would repeat trivially); words work as well as ids.

  Args:
    token_lists: one token sequence per output.
    n: n-gram order (>= 1).

  Returns:
    A fraction in ``[0, 1]`` (multiply by 100 for the percentages SLiC reports).

  References: Zhao et al., ICLR 2023 (arXiv 2210.00045), repetition analysis.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"repetition_rate: n must be an int >= 1, got {n!r}.")
  token_lists = list(token_lists)
  if not token_lists:
    raise ValueError("repetition_rate: no outputs given; decode at least one example.")
  return float(np.mean([has_repeated_ngram(list(t), int(n)) for t in token_lists]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties sharing the mean of their positions."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
    i = j + 1
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's ρ: Pearson correlation of the average ranks (nan if either is constant)."""
  rx, ry = _average_ranks(np.asarray(x, np.float64)), _average_ranks(np.asarray(y, np.float64))
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def rank_correlation(
  logp_BxK,
  sim_BxK,
  mask_BxK=None,
  *,
  return_per_input: bool = False,
):
  """Mean per-input Spearman correlation between candidate log-likelihood and quality.

  For each input, Spearman's ρ (average ranks for ties) between the valid candidates'
  log-likelihoods and their similarity to the reference. Inputs where either quantity has
  fewer than 2 distinct values among the valid candidates have no defined ρ and are left out
  of the mean.

  Args:
    logp_BxK: candidate sequence log-likelihoods under the model being judged.
    sim_BxK: candidate quality (e.g. ROUGE to the reference).
    mask_BxK: 1 for real candidates (default: all).
    return_per_input: also return the ``[B]`` array of ρ (nan where undefined).

  Returns:
    The mean ρ (nan when no input qualifies), or ``(mean, per_input_B)``.
  """
  logp, sim = np.asarray(logp_BxK, np.float64), np.asarray(sim_BxK, np.float64)
  mask = np.ones(logp.shape, bool) if mask_BxK is None else np.asarray(mask_BxK).astype(bool)
  if logp.ndim != 2 or logp.shape != sim.shape or logp.shape != mask.shape:
    raise ValueError(
      f"rank_correlation: logp {logp.shape}, sim {sim.shape} and mask {mask.shape} must share "
      "one [B, K] shape."
    )
  per = np.full(logp.shape[0], np.nan)
  for b in range(logp.shape[0]):
    x, y = logp[b][mask[b]], sim[b][mask[b]]
    if len(np.unique(x)) >= 2 and len(np.unique(y)) >= 2:
      per[b] = spearman(x, y)
  ok = ~np.isnan(per)
  mean = float(np.mean(per[ok])) if ok.any() else float("nan")
  return (mean, per) if return_per_input else mean


SPEARMAN_UNDEFINED = (
  "n/a: no input had 2+ distinct candidate log-probs and 2+ distinct ROUGE values"
)


def format_spearman(value: float) -> str:
  """``0.123``, or ``n/a`` with the reason when no input had a defined correlation."""
  return SPEARMAN_UNDEFINED if value is None or np.isnan(value) else f"{value:.3f}"


def win_rate(policy_scores, baseline_scores=None, *, tie: float = 0.5) -> float:
  """Share of comparisons won by the policy.

  Two forms:

  * ``win_rate(policy_scores, baseline_scores)``: pointwise scores (e.g. a reward model) of the
    policy's and the baseline's output for the same inputs; a win is ``policy > baseline``.
  * ``win_rate(p_policy_wins)``: a pairwise judge's probability that the policy's output is
    better; a win is ``p > 0.5``.

  Ties (equal scores, or ``p == 0.5``) count ``tie`` (default half a win).

  Returns:
    A fraction in ``[0, 1]``: the mean of :func:`wins`.
  """
  return float(np.mean(wins(policy_scores, baseline_scores, tie=tie)))


def wins(policy_scores, baseline_scores=None, *, tie: float = 0.5) -> np.ndarray:
  """Per-comparison outcomes of :func:`win_rate` (1 a win, ``tie`` a tie, 0 a loss), e.g. to
  bootstrap a win rate over examples.

  Raises:
    ValueError: shapes differ, no comparisons, or ``tie`` outside [0, 1].
  """
  a = np.asarray(policy_scores, np.float64)
  if baseline_scores is None:
    b = np.full(a.shape, 0.5)
  else:
    b = np.asarray(baseline_scores, np.float64)
    if a.shape != b.shape:
      raise ValueError(f"win_rate: policy {a.shape} and baseline {b.shape} shapes differ.")
  if a.size == 0:
    raise ValueError("win_rate: no comparisons given.")
  if not 0.0 <= tie <= 1.0:
    raise ValueError(f"win_rate: tie must be in [0, 1], got {tie}.")
  return np.where(a > b, 1.0, np.where(a == b, tie, 0.0))


def aggregate_rouge(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """Corpus ROUGE from per-example F-measures: the mean × 100 per type."""
  out = {}
  for name, values in scores.items():
    values = np.asarray(values, np.float64)
    if values.size == 0:
      raise ValueError(f"aggregate_rouge: no scores for {name!r}.")
    out[name] = float(np.mean(values) * 100.0)
  return out


def corpus_rouge(
  candidates: Sequence[str],
  references: Sequence[str],
  *,
  types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
  use_stemmer: bool = True,
  num_workers: int = 1,
) -> dict[str, float]:
  """Mean ROUGE F-measure × 100 over a corpus (see :func:`slicjax.similarity.rouge_scores`)."""
  if len(candidates) == 0:
    raise ValueError("corpus_rouge: empty corpus; decode at least one example.")
  return aggregate_rouge(
    similarity.rouge_scores(
      candidates, references, types=types, use_stemmer=use_stemmer, num_workers=num_workers
    )
  )


def bootstrap_ci(
  values: Sequence[float], *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
  """``(mean, low, high)``: the mean of ``values`` and its percentile bootstrap interval.

  Examples are resampled with replacement ``num_resamples`` times; for a paired comparison pass
  the per-example differences (see :func:`paired_bootstrap_ci`).

  Raises:
    ValueError: no values, or ``level`` outside (0, 1).
  """
  x = np.asarray(values, np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError("bootstrap_ci: no values; evaluate at least one example.")
  if not 0.0 < level < 1.0:
    raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}.")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, size=(num_resamples, x.size))
  means = x[idx].mean(axis=1)
  tail = (1.0 - level) / 2.0 * 100.0
  lo, hi = np.percentile(means, [tail, 100.0 - tail])
  return float(x.mean()), float(lo), float(hi)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
  """``(mean(a - b), low, high)`` over paired per-example scores (same examples, same order).

  Raises:
    ValueError: ``a`` and ``b`` differ in length.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_bootstrap_ci: {a.shape} vs {b.shape}; pair the same examples.")
  return bootstrap_ci(a - b, **kw)
