"""Greedy search and sampling: limits, frequencies vs the model distribution, per-example keys."""

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
  run,
  teacher_forced_logp,
)

from slicjax.decoding import sampling

V = 4
RNG = jax.random.PRNGKey(0)


def test_zero_temperature_and_top_k_one_equal_greedy():
  params = make_params(seed=3, eos_bias=0.3)
  init, cache = make_inputs(5, seed=4)
  greedy = run(sampling.greedy_search, params, init, cache, max_len=7)
  assert len(set(np.asarray(greedy.lengths_BxK[:, 0]))) > 1
  for kw in (dict(temperature=1e-6), dict(temperature=1.0, top_k=1), dict(temperature=0.0)):
    s = run(sampling.sample, params, init, cache, rng=RNG, max_len=7, num_samples=3, **kw)
    np.testing.assert_array_equal(s.tokens_BxKxL, np.repeat(greedy.tokens_BxKxL, 3, axis=1))
    np.testing.assert_allclose(s.logp_BxK, np.repeat(greedy.logp_BxK, 3, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(s.lengths_BxK, np.repeat(greedy.lengths_BxK, 3, axis=1))
  # Whereas ordinary sampling differs from greedy somewhere.
  s = run(sampling.sample, params, init, cache, rng=RNG, max_len=7, num_samples=3)
  assert np.any(np.asarray(s.tokens_BxKxL) != np.repeat(greedy.tokens_BxKxL, 3, axis=1))


def _filtered_probs(logits_V, temperature, top_k, top_p):
  """Independent numpy version of the sampling distribution at one step (no ties here)."""
  z = logits_V / temperature
  z[PAD] = -np.inf  # pad_id is never generated
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  keep[order[: top_k or len(z)]] = True
  q = np.where(keep, np.exp(z - z.max()), 0.0)
  q /= q.sum()
  if top_p < 1:
    qs = np.sort(q)[::-1]
    n = int(np.searchsorted(np.cumsum(qs), top_p) + 1)  # smallest prefix with mass >= p
    keep &= q >= qs[n - 1]
    q = np.where(keep, q, 0.0)
    q /= q.sum()
  return q


def _expected_outcomes(params, init, cache, temperature, top_k, top_p):
  """{row: {hypothesis: probability}} for max_len = 2, from the model's step logits."""
  step = make_step(params)
  b = init.shape[0]
  logits1, c1 = step(init, cache)
  out = []
  for r in range(b):
    q1 = _filtered_probs(np.asarray(logits1[r], np.float64), temperature, top_k, top_p)
    probs = {(EOS,): q1[EOS]}
    for a in range(V):
      if a in (EOS, PAD):
        continue
      c_r = jax.tree.map(lambda x: x[r : r + 1], c1)
      logits2 = np.asarray(step(jnp.array([a], jnp.int32), c_r)[0][0], np.float64)
      q2 = _filtered_probs(logits2, temperature, top_k, top_p)
      for bb in range(V):
        if bb != PAD:
          probs[(a, bb)] = q1[a] * q2[bb]
    out.append(probs)
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 0, 0.8), (0.7, 3, 0.8)])
def test_sample_frequencies_match_distribution(temperature, top_k, top_p):
  n = 4000
  params = make_params(seed=5, scale=1.0, eos_bias=0.5)
  init, cache = make_inputs(2, seed=6)
  res = run(
    sampling.sample,
    params,
    init,
    cache,
    rng=jax.random.PRNGKey(7),
    max_len=2,
    num_samples=n,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  expected = _expected_outcomes(params, init, cache, temperature, top_k, top_p)
  hyps = enumerate_hypotheses(make_step(params), init, cache, V, 2)
  toks, lens = np.asarray(res.tokens_BxKxL), np.asarray(res.lengths_BxK)
  logp = np.asarray(res.logp_BxK)
  filtered_out = 0
  for r in range(2):
    model_logp = {h: lp for h, lp, _ in hyps[r]}
    counts = dict.fromkeys(expected[r], 0)
    sampled = [tuple(toks[r, j, : lens[r, j]]) for j in range(n)]
    for h in sampled:
      counts[h] += 1
    # The returned log-prob is the untempered model's, whatever the sampling settings.
    np.testing.assert_allclose(logp[r], [model_logp[h] for h in sampled], rtol=1e-5, atol=1e-5)
    assert sum(counts.values()) == n
    chi2, dof = 0.0, -1
    for h, p in expected[r].items():
      if p == 0:
        assert counts[h] == 0, f"sampled a filtered-out sequence {h}"
        filtered_out += 1
      else:
        chi2 += (counts[h] - n * p) ** 2 / (n * p)
        dof += 1
    # Fixed seed; the bound is ~6 standard deviations of a chi-square with `dof` dof.
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)
  if top_k or top_p < 1:
    assert filtered_out > 0


def test_min_len_max_len_ngram_and_padding():
  params = make_params(seed=9, eos_bias=1.0)
  init, cache = make_inputs(4, seed=10)
  kw = dict(rng=RNG, num_samples=6, max_len=8)
  free = run(sampling.sample, params, init, cache, **kw)
  assert np.any(np.asarray(free.lengths_BxK) < 3)
  for min_len, ngram in ((3, 0), (0, 2), (2, 1)):
    res = run(
      sampling.sample, params, init, cache, min_len=min_len, no_repeat_ngram_size=ngram, **kw
    )
    toks, lens = np.asarray(res.tokens_BxKxL), np.asarray(res.lengths_BxK)
    for r in range(4):
      for j in range(6):
        n = lens[r, j]
        seq = list(toks[r, j, :n])
        assert max(min_len, 1) <= n <= 8
        assert np.all(toks[r, j, n:] == PAD)
        assert EOS not in seq[:-1] and (seq[-1] == EOS or n == 8)
        if ngram:
          assert not has_repeated_ngram(seq, ngram)
    np.testing.assert_allclose(
      res.logp_BxK,
      teacher_forced_logp(make_step(params), init, cache, toks, lens),
      rtol=1e-5,
      atol=1e-5,
    )
    np.testing.assert_array_equal(res.scores_BxK, res.logp_BxK)
  # n = 1 with V = 4 and pad never generated: every token once at most, so every row ends (EOS)
  # within 3 tokens; when all other tokens are used up the row is made to emit EOS.
  assert np.all(np.asarray(res.lengths_BxK) <= 3)
  never = make_params(seed=9, eos_bias=-50.0)
  res = run(sampling.sample, never, init, cache, **kw)
  np.testing.assert_array_equal(res.lengths_BxK, 8)


def test_per_example_keys_ignore_batch_composition():
  params = make_params(seed=13, scale=0.5)
  init, cache = make_inputs(4, seed=14)
  ids = jnp.array([10, 11, 12, 13], jnp.int32)
  kw = dict(rng=RNG, num_samples=5, max_len=6)
  full = run(sampling.sample, params, init, cache, example_ids=ids, **kw)
  rows = np.array([2, 0])
  sub = run(
    sampling.sample,
    params,
    init[rows],
    jax.tree.map(lambda x: x[rows], cache),
    example_ids=ids[rows],
    **kw,
  )
  np.testing.assert_array_equal(sub.tokens_BxKxL, np.asarray(full.tokens_BxKxL)[rows])
  np.testing.assert_allclose(sub.logp_BxK, np.asarray(full.logp_BxK)[rows], rtol=1e-6)
  # Default ids are arange(B); other ids give other samples for the same input.
  default = run(sampling.sample, params, init, cache, **kw)
  again = run(sampling.sample, params, init, cache, example_ids=jnp.arange(4), **kw)
  np.testing.assert_array_equal(default.tokens_BxKxL, again.tokens_BxKxL)
  assert np.any(np.asarray(default.tokens_BxKxL) != np.asarray(full.tokens_BxKxL))
  # The samples of one input differ from each other (each has its own key).
  assert len({tuple(x) for x in np.asarray(full.tokens_BxKxL[0])}) > 1
  typed = run(sampling.sample, params, init, cache, **{**kw, "rng": jax.random.key(0)})
  assert typed.tokens_BxKxL.shape == (4, 5, 6)


def test_bad_arguments_raise():
  step = make_step(make_params())
  init, cache = make_inputs(2)
  kw = dict(rng=RNG, max_len=4)
  for bad, match in [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(num_samples=0), "num_samples"),
    (dict(example_ids_B=jnp.arange(3)), "example_ids_B"),
    (dict(min_len=5), "min_len"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
  ]:
    with pytest.raises(ValueError, match=match):
      sampling.sample(step, init, cache, **{**kw, **bad})
  with pytest.raises(ValueError, match="rng"):
    sampling.sample(step, init, cache, rng=None, max_len=4)
  with pytest.raises(ValueError, match="leading dimension"):
    sampling.greedy_search(step, init, {**cache, "state": cache["state"][:1]}, max_len=4)
