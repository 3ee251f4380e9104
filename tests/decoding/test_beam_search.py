"""Beam search against exhaustive enumeration, greedy search and teacher-forced rescoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_fakes import (
  EOS,
  PAD,
  enumerate_hypotheses,
  has_repeated_ngram,
  make_inputs,
  make_params,
  make_step,
  penalty,
  run,
  teacher_forced_logp,
)

from slicjax.decoding import beam_search as bs
from slicjax.decoding import sampling

V = 4
B = 4


def _check_against_enumeration(res, hyps_per_row, alpha, max_len):
  tokens = np.asarray(res.tokens_BxKxL)
  k = tokens.shape[1]
  for row, hyps in enumerate(hyps_per_row):
    expected = sorted(hyps, key=lambda h: -h[1] / penalty(h[2], alpha))
    assert len(expected) <= k
    for j, (hyp, logp, length) in enumerate(expected):
      want = np.full(max_len, PAD)
      want[:length] = hyp
      np.testing.assert_array_equal(tokens[row, j], want, err_msg=f"row {row} rank {j}")
      np.testing.assert_allclose(res.logp_BxK[row, j], logp, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(
        res.scores_BxK[row, j], logp / penalty(length, alpha), rtol=1e-5, atol=1e-5
      )
      assert int(res.lengths_BxK[row, j]) == length
    n = len(expected)
    assert np.all(np.isneginf(np.asarray(res.scores_BxK[row, n:])))
    assert np.all(np.isneginf(np.asarray(res.logp_BxK[row, n:])))
    assert np.all(tokens[row, n:] == PAD) and np.all(np.asarray(res.lengths_BxK[row, n:]) == 0)


@pytest.mark.parametrize(
  "alpha,min_len,ngram,seed", [(0.0, 0, 0, 0), (0.6, 0, 0, 1), (0.6, 2, 1, 2), (2.0, 3, 2, 3)]
)
def test_wide_beam_equals_exhaustive_enumeration(alpha, min_len, ngram, seed):
  max_len = 3
  params = make_params(seed=seed, eos_bias=0.5)
  init, cache = make_inputs(3, seed=seed + 10)
  res = run(
    bs.beam_search,
    params,
    init,
    cache,
    beam_size=V**max_len,
    max_len=max_len,
    alpha=alpha,
    min_len=min_len,
    no_repeat_ngram_size=ngram,
  )
  step = make_step(params)
  hyps = enumerate_hypotheses(step, init, cache, V, max_len, min_len=min_len, ngram=ngram)
  assert {h[2] for row in hyps for h in row} == set(range(max(1, min_len), max_len + 1))
  if ngram or min_len:  # the constraints removed hypotheses (1 + 2 + 4 + 8 = 15 without them)
    assert all(len(row) < 15 for row in hyps)
  _check_against_enumeration(res, hyps, alpha, max_len)


def test_wide_beam_longer_sequences():
  max_len = 4
  params = make_params(seed=7, eos_bias=0.3)
  init, cache = make_inputs(2, seed=8)
  res = run(bs.beam_search, params, init, cache, beam_size=V**max_len, max_len=max_len, alpha=0.6)
  hyps = enumerate_hypotheses(make_step(params), init, cache, V, max_len)
  _check_against_enumeration(res, hyps, 0.6, max_len)


@pytest.mark.parametrize("min_len,ngram", [(0, 0), (3, 2)])
def test_beam_width_one_equals_greedy(min_len, ngram):
  v = 6
  params = make_params(seed=14, vocab=v, eos_bias=0.8)
  step = make_step(params)
  init, cache = make_inputs(6, seed=12)
  kw = dict(max_len=6, min_len=min_len, no_repeat_ngram_size=ngram)
  beam = run(bs.beam_search, params, init, cache, beam_size=1, alpha=0.0, **kw)
  greedy = run(sampling.greedy_search, params, init, cache, **kw)
  np.testing.assert_array_equal(beam.tokens_BxKxL, greedy.tokens_BxKxL)
  np.testing.assert_allclose(beam.logp_BxK, greedy.logp_BxK, rtol=1e-6)
  np.testing.assert_array_equal(beam.lengths_BxK, greedy.lengths_BxK)
  lens = np.asarray(greedy.lengths_BxK[:, 0])
  assert len(set(lens)) > 1  # rows end at different steps
  # Greedy itself, checked step by step against the argmax of the model's allowed logits.
  toks = np.asarray(greedy.tokens_BxKxL[:, 0])
  c, tok = cache, init
  for t in range(6):
    logits, c = step(tok, c)
    logits = np.asarray(logits)
    for r in range(6):
      if t < lens[r]:
        allowed = np.ones(v, bool)
        allowed[PAD] = False
        if t + 1 < min_len:
          allowed[EOS] = False
        for tok_v in range(v):
          if ngram and has_repeated_ngram(list(toks[r, :t]) + [tok_v], ngram):
            allowed[tok_v] = False
        assert toks[r, t] == np.argmax(np.where(allowed, logits[r], -np.inf))
      else:
        assert toks[r, t] == PAD
    tok = jnp.asarray(toks[:, t])


def test_small_beam_invariants():
  max_len, k = 7, 3
  params = make_params(seed=21, eos_bias=0.2)
  init, cache = make_inputs(B, seed=22)
  res = run(bs.beam_search, params, init, cache, beam_size=k, max_len=max_len, alpha=0.6)
  toks, lens = np.asarray(res.tokens_BxKxL), np.asarray(res.lengths_BxK)
  scores = np.asarray(res.scores_BxK)
  assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0)
  for r in range(B):
    for j in range(k):
      n = lens[r, j]
      assert 1 <= n <= max_len
      assert np.all(toks[r, j, n:] == PAD)
      assert EOS not in toks[r, j, : n - 1]
      assert toks[r, j, n - 1] == EOS or n == max_len
    assert len({tuple(x) for x in toks[r]}) == k  # distinct hypotheses
  # Raw log-probs recomputed by teacher forcing the returned tokens (checks cache reordering).
  step = make_step(params)
  np.testing.assert_allclose(
    res.logp_BxK, teacher_forced_logp(step, init, cache, toks, lens), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(scores, np.asarray(res.logp_BxK) / penalty(lens, 0.6), rtol=1e-5)


def test_ngram_blocking_never_repeats():
  params = make_params(seed=31, vocab=6, eos_bias=-3.0, scale=0.5)
  init, cache = make_inputs(B, seed=32)
  kw = dict(beam_size=4, max_len=10)
  plain = run(bs.beam_search, params, init, cache, **kw)
  for n in (1, 2):
    res = run(bs.beam_search, params, init, cache, no_repeat_ngram_size=n, **kw)
    toks, lens = np.asarray(res.tokens_BxKxL), np.asarray(res.lengths_BxK)
    for r in range(B):
      for j in range(4):
        if np.isfinite(res.scores_BxK[r, j]):
          assert not has_repeated_ngram(list(toks[r, j, : lens[r, j]]), n)
    # The constraint was active: without it the search repeats n-grams.
    ptoks, plens = np.asarray(plain.tokens_BxKxL), np.asarray(plain.lengths_BxK)
    assert any(
      has_repeated_ngram(list(ptoks[r, j, : plens[r, j]]), n) for r in range(B) for j in range(4)
    )


def test_min_and_max_len():
  init, cache = make_inputs(B, seed=42)
  likely = make_params(seed=41, eos_bias=3.0)  # EOS very likely
  kw = dict(beam_size=2, max_len=5, alpha=0.0)
  short = run(bs.beam_search, likely, init, cache, **kw)
  assert np.any(np.asarray(short.lengths_BxK) < 4)
  res = run(bs.beam_search, likely, init, cache, min_len=4, **kw)
  lens, toks = np.asarray(res.lengths_BxK), np.asarray(res.tokens_BxKxL)
  assert np.all(lens >= 4) and np.all(lens <= 5) and toks.shape == (B, 2, 5)
  assert np.all(toks[:, :, :3] != EOS)
  never = make_params(seed=43, eos_bias=-50.0)  # EOS essentially impossible
  res = run(bs.beam_search, never, init, cache, **kw)
  np.testing.assert_array_equal(res.lengths_BxK, 5)
  assert np.all(np.asarray(res.tokens_BxKxL) != EOS)


def test_results_do_not_depend_on_batch_composition():
  params = make_params(seed=81, eos_bias=0.2)
  init, cache = make_inputs(B, seed=82)
  full = run(bs.beam_search, params, init, cache, beam_size=3, max_len=8)
  for r in (0, 3):
    one = run(
      bs.beam_search,
      params,
      init[r : r + 1],
      jax.tree.map(lambda x: x[r : r + 1], cache),
      beam_size=3,
      max_len=8,
    )
    np.testing.assert_array_equal(one.tokens_BxKxL[0], full.tokens_BxKxL[r])
    np.testing.assert_allclose(one.scores_BxK[0], full.scores_BxK[r], rtol=1e-6)


def test_length_penalty_values():
  np.testing.assert_allclose(bs.length_penalty(jnp.array([1, 7]), 0.6), [1.0, 2.0**0.6], rtol=1e-6)
  np.testing.assert_allclose(bs.length_penalty(jnp.array([3, 9]), 0.0), [1.0, 1.0])


def test_bad_arguments_raise():
  step = make_step(make_params())
  init, cache = make_inputs(2)
  with pytest.raises(ValueError, match="beam_size"):
    bs.beam_search(step, init, cache, beam_size=0, max_len=3)
  with pytest.raises(ValueError, match="multiple of num_groups"):
    bs.diverse_beam_search(
      step, init, cache, beam_size=5, num_groups=2, diversity_strength=0.5, max_len=3
    )
  with pytest.raises(ValueError, match="diversity_strength"):
    bs.diverse_beam_search(
      step, init, cache, beam_size=4, num_groups=2, diversity_strength=-1.0, max_len=3
    )
  with pytest.raises(ValueError, match="alpha"):
    bs.beam_search(step, init, cache, beam_size=2, max_len=3, alpha=-1.0)
  with pytest.raises(ValueError, match="min_len"):
    bs.beam_search(step, init, cache, beam_size=2, max_len=3, min_len=4)
  with pytest.raises(ValueError, match="max_len"):
    bs.beam_search(step, init, cache, beam_size=2, max_len=0)
  with pytest.raises(ValueError, match="leading dimension"):
    bs.beam_search(step, init, {**cache, "pos": jnp.int32(0)}, beam_size=2, max_len=3)
  with pytest.raises(ValueError, match="1-D"):
    bs.beam_search(step, init[:, None], cache, beam_size=2, max_len=3)
  with pytest.raises(ValueError, match="must differ"):
    bs.beam_search(step, init, cache, beam_size=2, max_len=3, eos_id=0, pad_id=0)


# --- decoding conventions of other libraries: `transformers` length penalty, T5X finishing ---


def _power_penalty(hyp, alpha):
  n = len(hyp) - (hyp[-1] == EOS)  # transformers: generated tokens before EOS
  return max(n, 1) ** alpha


@pytest.mark.parametrize("alpha,seed", [(0.6, 4), (1.0, 5), (2.0, 6)])
def test_power_length_penalty_equals_exhaustive_enumeration(alpha, seed):
  max_len = 3
  params = make_params(seed=seed, eos_bias=0.5)
  init, cache = make_inputs(3, seed=seed + 10)
  res = run(bs.beam_search, params, init, cache, beam_size=V**max_len, max_len=max_len,
            alpha=alpha, length_penalty_style="power")
  hyps = enumerate_hypotheses(make_step(params), init, cache, V, max_len)
  tokens = np.asarray(res.tokens_BxKxL)
  for row, row_hyps in enumerate(hyps):
    expected = sorted(row_hyps, key=lambda h: -h[1] / _power_penalty(h[0], alpha))
    for j, (hyp, logp, length) in enumerate(expected):
      np.testing.assert_array_equal(tokens[row, j, :length], hyp, err_msg=f"row {row} rank {j}")
      np.testing.assert_allclose(
        res.scores_BxK[row, j], logp / _power_penalty(hyp, alpha), rtol=1e-5, atol=1e-5
      )


def test_power_length_penalty_values():
  lp = bs.length_penalty(jnp.array([1, 4, 4]), 0.5, "power", ends_in_eos=jnp.array([1, 1, 0]))
  np.testing.assert_allclose(lp, [1.0, 3.0**0.5, 2.0], rtol=1e-6)  # EOS alone counts as 1


def _reference_beam(step, init_B, cache, row, *, k, max_len, alpha, style, top2k):
  """Plain-Python beam search of one input, written from the definitions (float32 sums)."""
  lp = lambda n, eos: float(bs.length_penalty(n, alpha, style, ends_in_eos=eos))
  lp_max = lp(max_len, False)
  c0 = jax.tree.map(lambda x: x[row : row + 1], cache)
  alive = [((), np.float32(0.0), int(init_B[row]), c0)]
  finished = []  # (score, logp, tokens)
  n_top = min(2 * k, k * V)
  for t in range(max_len):
    cands = []
    for j in range(k):
      if j >= len(alive) or not np.isfinite(alive[j][1]):
        cands += [(-np.inf, j, v) for v in range(V)]
        continue
      toks, logp, last, c = alive[j]
      logits, _ = step(jnp.asarray([last], jnp.int32), c)
      lsm = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))[0]
      cands += [(np.float32(logp + lsm[v]) if v != PAD else -np.inf, j, v) for v in range(V)]
    order = sorted(range(len(cands)), key=lambda i: -cands[i][0])[:n_top]  # stable: ties by index
    is_last = t + 1 == max_len
    new_fin, new_alive = [], []
    for rank, i in enumerate(order):
      raw, j, v = cands[i]
      if not np.isfinite(raw):
        continue
      toks = alive[j][0] + (v,)
      if v == EOS and (top2k or rank < k) or (rank < k and is_last):
        new_fin.append((raw / lp(t + 1, v == EOS), raw, toks))
      if v != EOS and len(new_alive) < k:
        _, c = step(jnp.asarray([alive[j][2]], jnp.int32), alive[j][3])
        new_alive.append((toks, raw, v, c))
    finished = sorted(finished + new_fin, key=lambda f: -f[0])[:k]  # stable: old entries first
    alive = new_alive
    best_alive = max([a[1] for a in alive], default=-np.inf)
    if is_last or (len(finished) == k and finished[-1][0] >= best_alive / lp_max):
      break
  return finished


@pytest.mark.parametrize("style,alpha", [("gnmt", 0.8), ("power", 0.2)])
def test_finish_top_2k_matches_reference(style, alpha):
  k, max_len = 2, 4
  differs = 0
  for seed in range(6):
    params = make_params(seed=20 + seed, eos_bias=0.0)
    init, cache = make_inputs(4, seed=30 + seed)
    step = make_step(params)
    got = {}
    for top2k in (False, True):
      res = run(bs.beam_search, params, init, cache, beam_size=k, max_len=max_len, alpha=alpha,
                length_penalty_style=style, finish_top_2k=top2k)
      got[top2k] = res
      for row in range(init.shape[0]):
        ref = _reference_beam(step, init, cache, row, k=k, max_len=max_len, alpha=alpha,
                              style=style, top2k=top2k)
        for j, (score, logp, toks) in enumerate(ref):
          n = len(toks)
          np.testing.assert_array_equal(np.asarray(res.tokens_BxKxL[row, j, :n]), toks)
          assert int(res.lengths_BxK[row, j]) == n
          np.testing.assert_allclose(res.scores_BxK[row, j], score, rtol=1e-5)
          np.testing.assert_allclose(res.logp_BxK[row, j], logp, rtol=1e-5)
        assert np.all(np.isneginf(np.asarray(res.scores_BxK[row, len(ref) :])))
    differs += int(not np.array_equal(got[False].tokens_BxKxL, got[True].tokens_BxKxL))
  assert differs > 0, "finish_top_2k never changed a result: the cases do not exercise it"


def test_finish_top_2k_never_lowers_the_best_score():
  # Keeping more finished hypotheses can only raise (or keep) the best finished score.
  for seed in range(4):
    params = make_params(seed=40 + seed, eos_bias=0.8)
    init, cache = make_inputs(4, seed=50 + seed)
    kw = dict(beam_size=2, max_len=5, alpha=0.6)
    base = run(bs.beam_search, params, init, cache, **kw)
    t5x = run(bs.beam_search, params, init, cache, finish_top_2k=True, **kw)
    assert np.all(np.asarray(t5x.scores_BxK[:, 0]) >= np.asarray(base.scores_BxK[:, 0]) - 1e-6)


def test_bad_length_penalty_style():
  step = make_step(make_params())
  init, cache = make_inputs(2)
  with pytest.raises(ValueError, match="length_penalty must be one of"):
    bs.beam_search(step, init, cache, beam_size=2, max_len=3, length_penalty_style="hf")
