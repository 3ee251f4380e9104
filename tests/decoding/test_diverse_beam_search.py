"""Diverse (group) beam search: lambda = 0 reduces to independent beams; the Hamming penalty."""

import jax
import numpy as np
import pytest
from decoding_fakes import PAD, make_inputs, make_params, make_step, run, teacher_forced_logp

from slicjax.decoding import beam_search as bs

V = 4


def test_lambda_zero_equals_independent_beam_searches():
  k, g, max_len, b = 6, 3, 6, 4
  params = make_params(seed=51, eos_bias=0.3)
  init, cache = make_inputs(b, seed=52)
  div = run(
    bs.diverse_beam_search,
    params,
    init,
    cache,
    beam_size=k,
    num_groups=g,
    diversity_strength=0.0,
    max_len=max_len,
    alpha=0.6,
  )
  ref = run(bs.beam_search, params, init, cache, beam_size=k // g, max_len=max_len, alpha=0.6)
  # Every group is the same width-2 search: the sorted union is every reference beam 3 times.
  want_scores = np.sort(np.repeat(np.asarray(ref.scores_BxK), g, axis=1), axis=1)[:, ::-1]
  np.testing.assert_allclose(div.scores_BxK, want_scores, rtol=1e-6)
  np.testing.assert_allclose(
    np.sort(div.logp_BxK, axis=1),
    np.sort(np.repeat(np.asarray(ref.logp_BxK), g, axis=1), axis=1),
    rtol=1e-6,
  )
  for r in range(b):
    got = sorted(tuple(x) for x in np.asarray(div.tokens_BxKxL[r]))
    want = sorted(tuple(x) for x in np.asarray(ref.tokens_BxKxL[r]) for _ in range(g))
    assert got == want
  # One group is plain beam search whatever the strength.
  one = run(
    bs.diverse_beam_search,
    params,
    init,
    cache,
    beam_size=3,
    num_groups=1,
    diversity_strength=5.0,
    max_len=max_len,
    alpha=0.6,
  )
  plain = run(bs.beam_search, params, init, cache, beam_size=3, max_len=max_len, alpha=0.6)
  np.testing.assert_array_equal(one.tokens_BxKxL, plain.tokens_BxKxL)
  np.testing.assert_allclose(one.scores_BxK, plain.scores_BxK, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.4, 100.0])
def test_one_step_hamming_penalty(lam):
  # max_len = 1, one beam per group: group g's token is argmax(logp - lam * count of tokens chosen
  # by groups < g), computed here directly from the model's logits; logp stay unpenalized.
  g, b = 3, 8
  params = make_params(seed=61, scale=0.7)
  init, cache = make_inputs(b, seed=62)
  res = run(
    bs.diverse_beam_search,
    params,
    init,
    cache,
    beam_size=g,
    num_groups=g,
    diversity_strength=lam,
    max_len=1,
    alpha=0.0,
  )
  lp = np.asarray(jax.nn.log_softmax(make_step(params)(init, cache)[0], axis=-1), np.float64)
  lp_no_pad = np.where(np.arange(V) == PAD, -np.inf, lp)  # pad_id is never generated
  flips = 0
  for r in range(b):
    counts = np.zeros(V)
    chosen = []
    for _ in range(g):
      tok = int(np.argmax(lp_no_pad[r] - lam * counts))
      counts[tok] += 1
      chosen.append(tok)
    flips += len(set(chosen)) - 1
    order = sorted(chosen, key=lambda t: -lp[r, t])
    np.testing.assert_array_equal(np.asarray(res.tokens_BxKxL[r, :, 0]), order)
    np.testing.assert_allclose(res.logp_BxK[r], [lp[r, t] for t in order], rtol=1e-5)
  assert flips > 0  # the penalty changed some choices
  if lam > 10:  # a huge penalty makes the 3 groups pick the 3 distinct non-pad tokens
    assert flips == b * (g - 1)


def test_diversity_makes_distinct_beams_with_exact_logp():
  k, g, b = 8, 4, 3
  params = make_params(seed=71, vocab=6, eos_bias=-0.5)
  init, cache = make_inputs(b, seed=72)
  kw = dict(beam_size=k, num_groups=g, max_len=6, alpha=0.6)
  res = run(bs.diverse_beam_search, params, init, cache, diversity_strength=2.0, **kw)
  same = run(bs.diverse_beam_search, params, init, cache, diversity_strength=0.0, **kw)
  toks, lens = np.asarray(res.tokens_BxKxL), np.asarray(res.lengths_BxK)
  distinct = sum(len({tuple(x) for x in toks[r]}) for r in range(b))
  distinct0 = sum(len({tuple(x) for x in np.asarray(same.tokens_BxKxL[r])}) for r in range(b))
  assert distinct > distinct0
  step = make_step(params)
  np.testing.assert_allclose(
    res.logp_BxK, teacher_forced_logp(step, init, cache, toks, lens), rtol=1e-5, atol=1e-5
  )
  scores = np.asarray(res.scores_BxK)
  assert np.all(np.diff(scores, axis=1) <= 0)
  np.testing.assert_allclose(
    scores, np.asarray(res.logp_BxK) / ((5.0 + lens) / 6.0) ** 0.6, rtol=1e-5
  )
