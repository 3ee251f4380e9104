"""Similarity of candidates to the target: latent (decoder-state) F-measure, ROUGE, token
embeddings.

The **latent similarity** of SLiC is a BERTScore-style F-measure computed on the model's own
decoder output states, over spans of ``n`` tokens for each ``n`` in ``span_sizes``:

1. Padding is removed: the valid tokens of each sequence (mask 1) are taken in order, so a
   span is ``n`` consecutive *valid* tokens (masked positions never enter a span, even in the
   middle of a sequence).
2. Each span is represented by the **mean** of its ``n`` hidden states. (Cosine similarity is
   scale invariant, so mean and sum pooling give the same score.)
3. ``cos`` is the cosine similarity between every candidate span and every target span.
4. ``P_n`` = mean over candidate spans of their best ``cos`` among target spans; ``R_n`` = mean
   over target spans of their best ``cos`` among candidate spans;
   ``F_n = 2 P_n R_n / (P_n + R_n)`` (``0`` if ``|P_n + R_n| < 1e-6``).
5. ``s = |S| / |S_fit| · Σ_{n ∈ S_fit} F_n`` where ``S`` is ``span_sizes`` and ``S_fit`` the
   sizes with ``n <= min(len(candidate), len(target))``: span sizes longer than either sequence
   are **dropped and the sum renormalized**, so every score lies on the same scale whose
   maximum (identical sequences) is ``len(span_sizes)``. A candidate or target with no valid
   token scores ``0``.

Swapping candidate and target swaps ``P_n`` and ``R_n``, so the score is symmetric.

References: Zhao et al., "Calibrating Sequence Likelihood Improves Conditional Language
Generation", ICLR 2023 (arXiv 2210.00045); Zhang et al., "BERTScore", ICLR 2020.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-6


def _compact(hidden_XxLxD, mask_XxL):
  """Moves valid positions to the front (stable), returns hidden, valid mask, lengths."""
  valid = mask_XxL.astype(bool)
  order = jnp.argsort(jnp.logical_not(valid), axis=-1, stable=True)
  hidden = jnp.take_along_axis(hidden_XxLxD, order[..., None], axis=-2)
  length = jnp.sum(valid, axis=-1)
  return hidden, length


def _span_units(hidden_XxLxD, length_X, n: int):
  """Unit-norm mean of every ``n``-token span: ``([..., L-n+1, D], valid [..., L-n+1])``."""
  num = hidden_XxLxD.shape[-2] - n + 1
  pooled = sum(hidden_XxLxD[..., o : o + num, :] for o in range(n)) / n
  norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
  unit = pooled / jnp.maximum(norm, 1e-12)
  starts = jnp.arange(num).reshape((1,) * length_X.ndim + (num,))
  valid = starts + n <= length_X[..., None]
  return unit, valid


def _f_measure(cu_BxKxIxD, cvalid_BxKxI, ru_BxJxD, rvalid_BxJ):
  """``F_n`` ``[B, K]`` from unit span vectors of the candidates and of the target."""
  cos = jnp.einsum("bkid,bjd->bkij", cu_BxKxIxD, ru_BxJxD)
  rvalid_Bx1xJ = rvalid_BxJ[:, None, :]
  both = cvalid_BxKxI[..., :, None] & rvalid_Bx1xJ[..., None, :]
  cos = jnp.where(both, cos, -jnp.inf)
  best_c = jnp.where(cvalid_BxKxI, jnp.max(cos, axis=-1), 0.0)
  best_r = jnp.where(rvalid_Bx1xJ, jnp.max(cos, axis=-2), 0.0)
  p = jnp.sum(best_c, axis=-1) / jnp.maximum(jnp.sum(cvalid_BxKxI, axis=-1), 1)
  r = jnp.sum(best_r, axis=-1) / jnp.maximum(jnp.sum(rvalid_Bx1xJ, axis=-1), 1)
  denom = p + r
  ok = jnp.abs(denom) >= _EPS
  return jnp.where(ok, 2.0 * p * r / jnp.where(ok, denom, 1.0), 0.0)


def _check_span_sizes(span_sizes):
  sizes = tuple(span_sizes)
  if not sizes or any(not isinstance(n, (int, np.integer)) or n < 1 for n in sizes):
    raise ValueError(f"span_sizes must be a non-empty tuple of ints >= 1, got {span_sizes!r}.")
  if len(set(sizes)) != len(sizes):
    raise ValueError(f"span_sizes has duplicates: {span_sizes!r}; list each size once.")
  return tuple(int(n) for n in sizes)


@functools.partial(jax.jit, static_argnums=4)
def _latent_similarity(ch, cm, rh, rm, sizes):
  """Compiled body of :func:`latent_similarity` (one compilation per shape and span sizes)."""
  ch, clen_BxK = _compact(ch, cm)
  rh, rlen_B = _compact(rh, rm)
  total = jnp.zeros(clen_BxK.shape, jnp.float32)
  num_fit = jnp.zeros(clen_BxK.shape, jnp.float32)
  for n in sizes:
    if n > ch.shape[-2] or n > rh.shape[-2]:
      continue  # no sequence in the batch is this long: the size fits nowhere
    cu, cvalid = _span_units(ch, clen_BxK, n)
    ru, rvalid = _span_units(rh, rlen_B, n)
    fits = (clen_BxK >= n) & (rlen_B[:, None] >= n)
    total = total + jnp.where(fits, _f_measure(cu, cvalid, ru, rvalid), 0.0)
    num_fit = num_fit + fits
  return jnp.where(num_fit > 0, len(sizes) * total / jnp.maximum(num_fit, 1.0), 0.0)


def latent_similarity(
  cand_hidden_BxKxLxD: jax.Array,
  cand_mask_BxKxL: jax.Array,
  ref_hidden_BxLxD: jax.Array,
  ref_mask_BxL: jax.Array,
  *,
  span_sizes: Sequence[int] = (1, 2, 4, 8),
) -> jax.Array:
  """Span-level BERTScore F-measure between candidate and target hidden states.

  See the module docstring for the exact definition (mean pooling, drop-and-renormalize for
  span sizes that do not fit).

  .. math::

    s(\\hat y, \\bar y) = \\frac{|S|}{|S_{fit}|}\\sum_{n \\in S_{fit}}
      \\frac{2 P_n R_n}{P_n + R_n},\\quad
    P_n = \\frac{1}{|\\hat y_n|}\\sum_{a \\in \\hat y_n} \\max_{b \\in \\bar y_n} \\cos(a, b)

  Args:
    cand_hidden_BxKxLxD: decoder output states of each candidate's tokens.
    cand_mask_BxKxL: 1 on candidate tokens, 0 on padding.
    ref_hidden_BxLxD: decoder output states of the target's tokens (its length may differ
      from the candidates').
    ref_mask_BxL: 1 on target tokens, 0 on padding.
    span_sizes: the span lengths ``n``.

  Returns:
    ``[B, K]`` float32 scores in ``[-|S|, |S|]``; ``|S|`` for a candidate equal to the target.

  References: Zhao et al., ICLR 2023 (arXiv 2210.00045); Zhang et al., "BERTScore", ICLR 2020.
  """
  sizes = _check_span_sizes(span_sizes)
  ch = jnp.asarray(cand_hidden_BxKxLxD, jnp.float32)
  rh = jnp.asarray(ref_hidden_BxLxD, jnp.float32)
  cm, rm = jnp.asarray(cand_mask_BxKxL), jnp.asarray(ref_mask_BxL)
  if ch.ndim != 4 or rh.ndim != 3:
    raise ValueError(
      f"latent_similarity: candidate states must be [B, K, L, D] and target states [B, L, D], "
      f"got {ch.shape} and {rh.shape}."
    )
  if ch.shape[:3] != cm.shape or rh.shape[:2] != rm.shape:
    raise ValueError(
      f"latent_similarity: masks {cm.shape}, {rm.shape} must match the states' leading shapes "
      f"{ch.shape[:3]}, {rh.shape[:2]}."
    )
  if ch.shape[0] != rh.shape[0] or ch.shape[-1] != rh.shape[-1]:
    raise ValueError(
      f"latent_similarity: batch and model dims differ between candidates {ch.shape} and "
      f"target {rh.shape}; both must come from the same model and batch."
    )
  return _latent_similarity(ch, cm.astype(bool), rh, rm.astype(bool), sizes)


def token_embedding_similarity(
  cand_ids_BxKxL: jax.Array,
  cand_mask_BxKxL: jax.Array,
  ref_ids_BxL: jax.Array,
  ref_mask_BxL: jax.Array,
  embedding_VxD: jax.Array,
  *,
  span_sizes: Sequence[int] = (1, 2, 4, 8),
) -> jax.Array:
  """The latent-similarity F-measure on non-contextual token embeddings (the SLiC baseline).

  Identical to :func:`latent_similarity` with each token's hidden state replaced by its row of
  ``embedding_VxD``.

  Returns:
    ``[B, K]`` scores.

  References: Zhao et al., ICLR 2023 (arXiv 2210.00045), similarity-function ablation.
  """
  emb = jnp.asarray(embedding_VxD)
  if emb.ndim != 2:
    raise ValueError(f"token_embedding_similarity: embedding must be [V, D], got {emb.shape}.")
  cand_ids_BxKxL, ref_ids_BxL = jnp.asarray(cand_ids_BxKxL), jnp.asarray(ref_ids_BxL)
  for name, ids in (("cand_ids", cand_ids_BxKxL), ("ref_ids", ref_ids_BxL)):
    if (
      not isinstance(ids, jax.core.Tracer)
      and ids.size
      and (int(jnp.min(ids)) < 0 or int(jnp.max(ids)) >= emb.shape[0])
    ):
      raise ValueError(
        f"token_embedding_similarity: {name} holds ids outside [0, V={emb.shape[0]}); use the "
        "embedding table of the tokenizer that produced the ids."
      )
  return latent_similarity(
    emb[cand_ids_BxKxL], cand_mask_BxKxL, emb[ref_ids_BxL], ref_mask_BxL, span_sizes=span_sizes
  )


@functools.lru_cache(maxsize=8)
def _scorer(types: tuple[str, ...], use_stemmer: bool):
  """One ``RougeScorer`` per (types, stemmer) per process (building one validates the names)."""
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)


def _rouge_chunk(args):
  """Worker: F-measures of one chunk of (candidate, reference) pairs, per ROUGE type."""
  types, use_stemmer, pairs = args
  scorer = _scorer(types, bool(use_stemmer))
  out = np.zeros((len(types), len(pairs)), np.float64)
  for i, (cand, ref) in enumerate(pairs):
    scores = scorer.score(ref, cand)  # rouge-score's order is (target, prediction)
    for t, name in enumerate(types):
      out[t, i] = scores[name].fmeasure
  return out


def rouge_scores(
  candidates: Sequence[str] | Sequence[Sequence[str]],
  references: Sequence[str],
  *,
  types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
  use_stemmer: bool = True,
  num_workers: int = 1,
) -> dict[str, np.ndarray]:
  """ROUGE F-measures of candidates against references, with the ``rouge-score`` package.

  Args:
    candidates: ``B`` strings (one candidate per reference) or ``B`` lists of ``K`` strings
      (a candidate set per reference).
    references: ``B`` reference strings.
    types: ROUGE types understood by ``rouge_score.rouge_scorer.RougeScorer`` (``rouge1`` ..
      ``rouge9``, ``rougeL``, ``rougeLsum``).
    use_stemmer: Porter stemming before matching (the usual setting for summarization).
    num_workers: processes to score in parallel (``spawn`` start method, so it is safe after
      JAX has started threads); ``1`` scores in this process.

  Returns:
    ``{type: F-measure}`` as float64 numpy arrays of shape ``[B]`` or ``[B, K]``.
  """
  types = tuple(types)
  _scorer(types, bool(use_stemmer))  # validates the type names
  if num_workers < 1:
    raise ValueError(f"rouge_scores: num_workers must be >= 1, got {num_workers}.")
  references = list(references)
  candidates = list(candidates)
  if len(candidates) != len(references):
    raise ValueError(
      f"rouge_scores: {len(candidates)} candidate entries for {len(references)} references; "
      "give one candidate (or one list of candidates) per reference."
    )
  if any(not isinstance(r, str) for r in references):
    raise ValueError("rouge_scores: references must be strings; detokenize ids first.")
  nested = bool(candidates) and not isinstance(candidates[0], str)
  if nested:
    ks = {len(c) for c in candidates}
    if len(ks) != 1 or any(isinstance(c, str) for c in candidates):
      raise ValueError(
        f"rouge_scores: candidate lists must all have the same length K, got lengths {sorted(ks)}"
        "; pad candidate sets (e.g. with empty strings) and mask them downstream."
      )
    k = ks.pop()
    pairs = [(c, r) for row, r in zip(candidates, references) for c in row]
    shape = (len(references), k)
  else:
    pairs = list(zip(candidates, references))
    shape = (len(references),)
  if any(not isinstance(c, str) for c, _ in pairs):
    raise ValueError("rouge_scores: candidates must be strings; detokenize ids first.")
  workers = min(num_workers, max(len(pairs), 1))
  if workers == 1:
    out = _rouge_chunk((types, use_stemmer, pairs))
  else:
    bounds = np.linspace(0, len(pairs), workers + 1).astype(int)
    chunks = [(types, use_stemmer, pairs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      out = np.concatenate(pool.map(_rouge_chunk, chunks), axis=1)
  return {name: out[t].reshape(shape) for t, name in enumerate(types)}
