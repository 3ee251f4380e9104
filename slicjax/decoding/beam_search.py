"""Beam search and diverse (group) beam search over a ``tokens_to_logits`` step.

One jit-compatible ``lax.while_loop`` over ``B * K`` beam rows, with an alive set and a finished
set per group (plain beam search is one group of K beams). At step ``t`` each group ``g`` of
``Kg = K / G`` alive beams:

1. extends every alive beam by every token: ``cand = alive_logp + log_softmax(logits)``, with
   constrained tokens (``pad_id``, which is never generated, min length, n-gram blocking; see
   ``sampling.allowed_tokens``) at ``-inf``;
2. ranks the ``Kg * V`` candidates by ``cand - lambda * count_g[token]`` (diverse beam search;
   ``count_g`` = how many of the candidates chosen at this step by groups ``< g`` end in that
   token) and takes the top ``2 * Kg``;
3. the group's top ``Kg`` candidates are its choices at this step: those ending in EOS become
   finished hypotheses (at ``t + 1 = max_len`` all of them do, without EOS); the best ``Kg``
   candidates not ending in EOS become the new alive beams (their caches are gathered with
   ``jnp.take(leaf, b*K + beam, axis=0)``);
4. the group's finished set keeps the ``Kg`` best finished hypotheses ever found, ranked by the
   GNMT / T5 length-penalized score ``logp / ((5 + |y|) / 6) ** alpha`` (|y| counts EOS).

Finished hypotheses are never lost. A group stops (``done``) once its finished set is full and no
alive beam can beat its worst member: raw log-probabilities only decrease and the penalty
divisor is largest at ``max_len``, so ``max alive_logp / lp(max_len)`` bounds every future
score. Ties keep the earlier hypothesis, so a stopped group's result never changes and each input
is decoded independently of the rest of the batch.

Beam search with one beam and ``alpha = 0`` is greedy search: an EOS is only finished when it is
the best candidate, which then ends the search. (With ``alpha > 0`` a single beam may continue
past greedy's EOS when a longer hypothesis could still earn a better penalized score.) With width >= the number of hypotheses (e.g.
V ** L) nothing is pruned and the result is the exact top-K of exhaustive enumeration.

References: Wu et al., "Google's Neural Machine Translation System", 2016 (length penalty);
Vijayakumar et al., "Diverse Beam Search", AAAI 2018 (Hamming diversity).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from slicjax.decoding import sampling, types
from slicjax.decoding.types import BeamState, DecodeResult

LENGTH_PENALTIES = ("gnmt", "power")


def length_penalty(lengths, alpha: float, style: str = "gnmt", ends_in_eos=False):
  """Length penalty divisor of a hypothesis (1 when ``alpha = 0``); score = logp / divisor.

  * ``"gnmt"`` (GNMT / T5, the default): ``((5 + |y|) / 6) ** alpha``, ``|y|`` counting EOS;
  * ``"power"`` (Hugging Face ``transformers``): ``n ** alpha`` with ``n`` the generated tokens
    before EOS (EOS not counted), at least 1.

  .. math::

     \\mathrm{lp}(y) = \\left(\\frac{5 + |y|}{6}\\right)^{\\alpha}, \\qquad
     \\mathrm{score}(y) = \\frac{\\log P(y \\mid x)}{\\mathrm{lp}(y)}

  References: Wu et al., "Google's Neural Machine Translation System", 2016.
  """
  lengths = jnp.asarray(lengths, jnp.float32)
  if alpha == 0:
    return jnp.ones_like(lengths)
  if style == "power":
    n = lengths - jnp.asarray(ends_in_eos, jnp.float32)
    return jnp.maximum(n, 1.0) ** alpha
  if style != "gnmt":
    raise ValueError(f"length penalty style must be one of {LENGTH_PENALTIES}, got {style!r}.")
  return ((5.0 + lengths) / 6.0) ** alpha


def _check_beam_args(beam_size, num_groups, alpha, diversity_strength, length_style="gnmt"):
  if length_style not in LENGTH_PENALTIES:
    raise ValueError(
      f"length_penalty must be one of {LENGTH_PENALTIES} ('gnmt': ((5 + |y|) / 6) ** alpha; "
      f"'power': |y| ** alpha as in transformers), got {length_style!r}."
    )
  if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
    raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}.")
  if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
    raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  if beam_size % num_groups:
    raise ValueError(
      f"beam_size ({beam_size}) must be a multiple of num_groups ({num_groups}); each group "
      f"gets beam_size // num_groups beams."
    )
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
    raise ValueError(f"alpha (length penalty exponent) must be a number >= 0, got {alpha!r}.")
  if (
    isinstance(diversity_strength, bool)
    or not isinstance(diversity_strength, (int, float))
    or diversity_strength < 0
  ):
    raise ValueError(f"diversity_strength must be a number >= 0, got {diversity_strength!r}.")


def _merge(old, new, k: int):
  """Top-``k`` of the concatenation of (tokens, logp, scores, lengths) tuples along axis 1.

  ``jax.lax.top_k`` puts the lower index first on ties, so old entries win ties.
  """
  toks, logp, scores, lens = (jnp.concatenate([o, n], axis=1) for o, n in zip(old, new))
  top_scores, idx_BxK = jax.lax.top_k(scores, k)
  take = lambda x: jnp.take_along_axis(
    x, idx_BxK.reshape(idx_BxK.shape + (1,) * (x.ndim - 2)), axis=1
  )
  return take(toks), take(logp), top_scores, take(lens)


def _search(
  tokens_to_logits,
  init_tokens_B,
  cache,
  *,
  beam_size: int,
  num_groups: int,
  max_len: int,
  eos_id: int,
  pad_id: int,
  alpha: float,
  min_len: int,
  no_repeat_ngram_size: int,
  diversity_strength: float,
  length_style: str = "gnmt",
  finish_top_2k: bool = False,
) -> DecodeResult:
  b = init_tokens_B.shape[0]
  k, g_count = beam_size, num_groups
  kg = k // g_count
  f32 = jnp.float32
  lp_max = length_penalty(max_len, alpha, length_style)  # the largest divisor of any length
  first_alive_K = jnp.tile(jnp.where(jnp.arange(kg) == 0, 0.0, -jnp.inf), g_count).astype(f32)
  state = BeamState(
    step=jnp.zeros((), jnp.int32),
    last_tokens_BK=jnp.repeat(jnp.asarray(init_tokens_B, jnp.int32), k),
    alive_tokens_BxKxL=jnp.full((b, k, max_len), pad_id, jnp.int32),
    alive_logp_BxK=jnp.broadcast_to(first_alive_K[None, :], (b, k)),
    finished_tokens_BxKxL=jnp.full((b, k, max_len), pad_id, jnp.int32),
    finished_logp_BxK=jnp.full((b, k), -jnp.inf, f32),
    finished_scores_BxK=jnp.full((b, k), -jnp.inf, f32),
    finished_lengths_BxK=jnp.zeros((b, k), jnp.int32),
    done_BxG=jnp.zeros((b, g_count), bool),
    cache=jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache),
  )

  def cond(s: BeamState):
    return (s.step < max_len) & ~jnp.all(s.done_BxG)

  def body(s: BeamState) -> BeamState:
    t = s.step
    logits_BKxV, new_cache = tokens_to_logits(s.last_tokens_BK, s.cache)
    v = logits_BKxV.shape[-1]
    logp_BKxV = jax.nn.log_softmax(logits_BKxV.astype(f32), axis=-1)
    allowed_BKxV = sampling.allowed_tokens(
      s.alive_tokens_BxKxL.reshape(b * k, max_len),
      t,
      v,
      eos_id=eos_id,
      pad_id=pad_id,
      min_len=min_len,
      no_repeat_ngram_size=no_repeat_ngram_size,
    )
    logp_BKxV = jnp.where(allowed_BKxV, logp_BKxV, -jnp.inf)
    cand_BxKxV = s.alive_logp_BxK[:, :, None] + logp_BKxV.reshape(b, k, v)
    is_last = t + 1 >= max_len
    lp_eos = length_penalty(t + 1, alpha, length_style, ends_in_eos=True)
    lp_cut = length_penalty(t + 1, alpha, length_style, ends_in_eos=False)
    count_BxV = jnp.zeros((b, v), f32)
    beam_idx, alive_toks, alive_logp, fin = [], [], [], []
    n_top = min(2 * kg, kg * v)
    for g in range(g_count):
      sl = slice(g * kg, (g + 1) * kg)
      raw_BxC = cand_BxKxV[:, sl].reshape(b, kg * v)
      rank_BxC = raw_BxC - diversity_strength * jnp.tile(count_BxV, (1, kg))
      top_rank_BxN, top_idx_BxN = jax.lax.top_k(rank_BxC, n_top)
      top_raw_BxN = jnp.take_along_axis(raw_BxC, top_idx_BxN, axis=1)
      top_beam_BxN, top_tok_BxN = top_idx_BxN // v, top_idx_BxN % v
      top_valid_BxN = jnp.isfinite(top_rank_BxN)
      chosen_BxN = top_valid_BxN & (jnp.arange(n_top) < kg)[None, :]
      is_eos_BxN = top_tok_BxN == eos_id
      # Diversity: the tokens this group chose at this step penalize the later groups.
      if diversity_strength and g + 1 < g_count:
        w_BxN = (chosen_BxN & ~s.done_BxG[:, g : g + 1]).astype(f32)
        rows_BxN = jnp.broadcast_to(jnp.arange(b)[:, None], top_tok_BxN.shape)
        count_BxV = count_BxV.at[rows_BxN, top_tok_BxN].add(w_BxN)
      # Finished candidates: the group's top-Kg choices that end in EOS (T5X style: every EOS
      # among its top 2Kg), and at the last step (t + 1 = max_len) all of its choices.
      eos_ok_BxN = (top_valid_BxN if finish_top_2k else chosen_BxN) & is_eos_BxN
      fin_ok_BxN = eos_ok_BxN | (chosen_BxN & is_last)
      prefix_BxNxL = jnp.take_along_axis(
        s.alive_tokens_BxKxL[:, sl], top_beam_BxN[:, :, None], axis=1
      )
      with_tok_BxNxL = jax.lax.dynamic_update_slice(
        prefix_BxNxL, top_tok_BxN[:, :, None], (0, 0, t)
      )
      fin_logp_BxN = jnp.where(fin_ok_BxN, top_raw_BxN, -jnp.inf)
      new_fin = (
        with_tok_BxNxL,
        fin_logp_BxN,
        fin_logp_BxN / jnp.where(is_eos_BxN, lp_eos, lp_cut),
        jnp.full(fin_logp_BxN.shape, t + 1, jnp.int32),
      )
      # New alive beams: the best Kg candidates (by rank) that do not end in EOS.
      _, pos_BxKg = jax.lax.top_k(jnp.where(is_eos_BxN, -jnp.inf, top_rank_BxN), kg)
      pick = lambda x: jnp.take_along_axis(x, pos_BxKg, axis=1)
      a_logp_BxKg = jnp.where(pick(top_valid_BxN & ~is_eos_BxN), pick(top_raw_BxN), -jnp.inf)
      a_toks_BxKgxL = jnp.take_along_axis(with_tok_BxNxL, pos_BxKg[:, :, None], axis=1)
      old = (
        s.finished_tokens_BxKxL[:, sl],
        s.finished_logp_BxK[:, sl],
        s.finished_scores_BxK[:, sl],
        s.finished_lengths_BxK[:, sl],
      )
      merged = _merge(old, new_fin, kg)
      fin.append(merged)
      beam_idx.append(g * kg + pick(top_beam_BxN))
      alive_toks.append(a_toks_BxKgxL)
      alive_logp.append(a_logp_BxKg)
    cat = lambda xs: jnp.concatenate(xs, axis=1)
    fin_toks, fin_logp, fin_scores, fin_lens = (cat([f[i] for f in fin]) for i in range(4))
    new_alive_logp = cat(alive_logp)
    new_alive_toks = cat(alive_toks)
    tok_BxK = jax.lax.dynamic_slice_in_dim(new_alive_toks, t, 1, axis=2)[:, :, 0]
    flat_BK = (jnp.arange(b)[:, None] * k + cat(beam_idx)).reshape(-1)
    # "clip": the indices are in range; the default "fill" adds a select over the whole cache
    new_cache = jax.tree.map(lambda x: jnp.take(x, flat_BK, axis=0, mode="clip"), new_cache)
    # Done: full finished set that no alive beam can still beat.
    worst_BxG = jnp.min(fin_scores.reshape(b, g_count, kg), axis=-1)
    bound_BxG = jnp.max(new_alive_logp.reshape(b, g_count, kg), axis=-1) / lp_max
    done_BxG = s.done_BxG | (worst_BxG >= bound_BxG) | is_last
    return BeamState(
      step=t + 1,
      last_tokens_BK=tok_BxK.reshape(-1),
      alive_tokens_BxKxL=new_alive_toks,
      alive_logp_BxK=new_alive_logp,
      finished_tokens_BxKxL=fin_toks,
      finished_logp_BxK=fin_logp,
      finished_scores_BxK=fin_scores,
      finished_lengths_BxK=fin_lens,
      done_BxG=done_BxG,
      cache=new_cache,
    )

  s = jax.lax.while_loop(cond, body, state)
  # All K hypotheses sorted by score (stable: ties keep group order).
  scores_BxK, order_BxK = jax.lax.top_k(s.finished_scores_BxK, k)
  toks = jnp.take_along_axis(s.finished_tokens_BxKxL, order_BxK[:, :, None], axis=1)
  logp = jnp.take_along_axis(s.finished_logp_BxK, order_BxK, axis=1)
  lens = jnp.take_along_axis(s.finished_lengths_BxK, order_BxK, axis=1)
  empty_BxK = ~jnp.isfinite(scores_BxK)
  return DecodeResult(
    tokens_BxKxL=jnp.where(empty_BxK[:, :, None], pad_id, toks),
    logp_BxK=jnp.where(empty_BxK, -jnp.inf, logp),
    scores_BxK=scores_BxK,
    lengths_BxK=jnp.where(empty_BxK, 0, lens),
  )


def beam_search(
  tokens_to_logits: types.StepFn,
  init_tokens_B: jax.Array,
  cache: Any,
  *,
  beam_size: int,
  max_len: int,
  eos_id: int = 1,
  pad_id: int = 0,
  alpha: float = 0.6,
  min_len: int = 0,
  no_repeat_ngram_size: int = 0,
  length_penalty_style: str = "gnmt",
  finish_top_2k: bool = False,
) -> DecodeResult:
  """Beam search returning all ``beam_size`` finished hypotheses per input, best first.

  Args:
    tokens_to_logits: the step ``(tokens_B, cache) -> (logits_BxV, new_cache)``.
    init_tokens_B: int32 ``[B]``, the first token fed to the step (BOS, last prompt token, ...).
    cache: the step's cache; every leaf has leading dimension B (it is repeated K times and
      reordered with ``jnp.take`` along axis 0).
    beam_size: K, beams per input.
    max_len: tokens to generate at most (L of the result).
    eos_id: end-of-sequence id.
    pad_id: written after EOS and in empty slots; never generated.
    alpha: length-penalty exponent (:func:`length_penalty`); 0 ranks by raw log-probability.
    min_len: EOS is forbidden before this many tokens (EOS included) can be reached.
    no_repeat_ngram_size: forbid tokens completing an n-gram already in the hypothesis (0 = off).
    length_penalty_style: ``"gnmt"`` (``((5 + |y|) / 6) ** alpha``, T5 / GNMT) or ``"power"``
      (``|y| ** alpha``, EOS not counted, as Hugging Face ``transformers``); see
      :func:`length_penalty`.
    finish_top_2k: T5X-style finishing: a hypothesis ending in EOS is kept when it ranks among
      the top ``2K`` candidates of its step, not only among the top ``K`` (the alive beams are
      the same either way).

  Returns:
    :class:`DecodeResult`: ``scores_BxK`` (descending) are length-penalized, ``logp_BxK`` raw.
    Slots for which no hypothesis exists (fewer than K possible) have score and logp ``-inf``,
    all-pad tokens and length 0.
  """
  types.check_decode_args(
    init_tokens_B,
    cache,
    max_len=max_len,
    min_len=min_len,
    eos_id=eos_id,
    pad_id=pad_id,
    no_repeat_ngram_size=no_repeat_ngram_size,
  )
  _check_beam_args(beam_size, 1, alpha, 0.0, length_penalty_style)
  return _search(
    tokens_to_logits,
    jnp.asarray(init_tokens_B),
    cache,
    beam_size=beam_size,
    num_groups=1,
    max_len=max_len,
    eos_id=eos_id,
    pad_id=pad_id,
    alpha=float(alpha),
    min_len=min_len,
    no_repeat_ngram_size=no_repeat_ngram_size,
    length_style=length_penalty_style,
    finish_top_2k=bool(finish_top_2k),
    diversity_strength=0.0,
  )


def diverse_beam_search(
  tokens_to_logits: types.StepFn,
  init_tokens_B: jax.Array,
  cache: Any,
  *,
  beam_size: int,
  num_groups: int,
  diversity_strength: float,
  max_len: int,
  eos_id: int = 1,
  pad_id: int = 0,
  alpha: float = 0.6,
  min_len: int = 0,
  no_repeat_ngram_size: int = 0,
  length_penalty_style: str = "gnmt",
  finish_top_2k: bool = False,
) -> DecodeResult:
  """Diverse beam search: ``num_groups`` groups of ``beam_size // num_groups`` beams.

  Groups are searched in order at every step; group ``g`` ranks its candidates by

  .. math::

     \\log P(y_{\\le t} \\mid x) - \\lambda \\sum_{h < g} \\#\\{\\text{candidates chosen by group }
     h \\text{ at step } t \\text{ ending in } y_t\\}

  (Hamming diversity, :math:`\\lambda` = ``diversity_strength``). The penalty only steers the
  selection: the returned ``logp_BxK`` are raw model log-probabilities and ``scores_BxK`` their
  length-penalized values. A group that has stopped no longer penalizes the others. With
  ``diversity_strength = 0`` every group is an independent beam search of width
  ``beam_size // num_groups``.

  References: Vijayakumar et al., "Diverse Beam Search: Decoding Diverse Solutions from Neural
  Sequence Models", AAAI 2018.

  Returns:
    :class:`DecodeResult` with all ``beam_size`` hypotheses (every group's finished set) sorted
    by score, ties in group order. Other arguments as in :func:`beam_search`.
  """
  types.check_decode_args(
    init_tokens_B,
    cache,
    max_len=max_len,
    min_len=min_len,
    eos_id=eos_id,
    pad_id=pad_id,
    no_repeat_ngram_size=no_repeat_ngram_size,
  )
  _check_beam_args(beam_size, num_groups, alpha, diversity_strength, length_penalty_style)
  return _search(
    tokens_to_logits,
    jnp.asarray(init_tokens_B),
    cache,
    beam_size=beam_size,
    num_groups=num_groups,
    max_len=max_len,
    eos_id=eos_id,
    pad_id=pad_id,
    alpha=float(alpha),
    min_len=min_len,
    no_repeat_ngram_size=no_repeat_ngram_size,
    length_style=length_penalty_style,
    finish_top_2k=bool(finish_top_2k),
    diversity_strength=float(diversity_strength),
  )
