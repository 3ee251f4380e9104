"""top_k_mask, top_p_mask and no_repeat_ngram_mask on hand-built inputs and brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.decoding import sampling

NEG = -np.inf


def test_top_k_hand_built_with_ties():
  logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, NEG, 5.0, -1.0, 4.0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 1), [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
  # The second-largest value 2.0 is shared: both tied tokens are kept.
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 2), [[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 3), [[1, 0, 1, 1, 0], [1, 0, 1, 0, 1]])
  for k in (5, 9):  # k >= V keeps everything, -inf included
    assert np.all(np.asarray(sampling.top_k_mask(logits, k)))


def test_top_k_matches_sorting_without_ties():
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 7).astype(np.float32)
  for k in range(1, 8):
    got = np.asarray(sampling.top_k_mask(jnp.asarray(logits), k))
    want = np.zeros_like(got)
    for r in range(6):
      want[r, np.argsort(-logits[r])[:k]] = True
    np.testing.assert_array_equal(got, want)


def test_top_p_hand_built():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125], [0.125, 0.5, 0.125, 0.25]]))
  # p = 0.45: the top token alone already has mass 0.5.
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 0.45), [[1, 0, 0, 0], [0, 1, 0, 0]])
  # p = 0.7: 0.5 < 0.7, 0.5 + 0.25 >= 0.7.
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 0.7), [[1, 1, 0, 0], [0, 1, 0, 1]])
  # p = 0.8 needs one of the two tied 0.125 tokens: ties are closed, so both are kept.
  assert np.all(np.asarray(sampling.top_p_mask(logits, 0.8)))


def test_top_p_ties_and_p_one():
  logits = jnp.log(jnp.array([[0.4, 0.2, 0.2, 0.2]]))
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 0.35), [[1, 0, 0, 0]])
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 0.5), [[1, 1, 1, 1]])
  with_zero = jnp.array([[1.0, NEG, 0.0]])
  np.testing.assert_array_equal(sampling.top_p_mask(with_zero, 1.0), [[1, 1, 1]])
  np.testing.assert_array_equal(sampling.top_p_mask(with_zero, 0.99), [[1, 0, 1]])


def test_top_p_matches_brute_force_smallest_set():
  rng = np.random.RandomState(1)
  logits = rng.randn(8, 5) * 1.5
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for p in (0.1, 0.3, 0.5, 0.77, 0.95):
    got = np.asarray(sampling.top_p_mask(jnp.asarray(logits, jnp.float32), p))
    for r in range(8):
      # The smallest subset with mass >= p; among those of that size the most massive one.
      best = None
      for size in range(1, 6):
        sets = [s for s in itertools.combinations(range(5), size) if probs[r, list(s)].sum() >= p]
        if sets:
          best = max(sets, key=lambda s: probs[r, list(s)].sum())
          break
      want = np.zeros(5, bool)
      want[list(best)] = True
      np.testing.assert_array_equal(got[r], want, err_msg=f"p={p} row {r}")


def test_mask_argument_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="k >= 1"):
    sampling.top_k_mask(x, 0)
  with pytest.raises(ValueError, match=r"p in \(0, 1\]"):
    sampling.top_p_mask(x, 0.0)
  with pytest.raises(ValueError, match=r"p in \(0, 1\]"):
    sampling.top_p_mask(x, 1.5)


def test_no_repeat_ngram_hand_built():
  toks = jnp.array([[2, 3, 2, 3, 0, 0]])
  allowed = lambda t, n: np.asarray(sampling.no_repeat_ngram_mask(toks, t, n, 5))[0]
  np.testing.assert_array_equal(allowed(3, 2), [1, 1, 1, 0, 1])  # (2, 3) seen: ban 3 after 2
  np.testing.assert_array_equal(allowed(3, 1), [1, 1, 0, 0, 1])  # every seen token banned
  np.testing.assert_array_equal(allowed(3, 3), [1, 1, 1, 1, 1])  # (3, 2, *) never seen
  np.testing.assert_array_equal(allowed(4, 3), [1, 1, 0, 1, 1])  # (2, 3, 2) seen: ban 2
  np.testing.assert_array_equal(allowed(2, 2), [1, 1, 1, 1, 1])  # later tokens ignored
  np.testing.assert_array_equal(allowed(0, 1), [1, 1, 1, 1, 1])


def test_no_repeat_ngram_matches_brute_force():
  rng = np.random.RandomState(2)
  v, length = 3, 9
  toks = rng.randint(0, v, size=(12, length))
  mask = jax.jit(sampling.no_repeat_ngram_mask, static_argnums=(2, 3))
  for n in (1, 2, 3, 4):
    for t in range(length + 1):
      got = np.asarray(mask(jnp.asarray(toks), jnp.int32(t), n, v))
      for r in range(12):
        prefix = list(toks[r, :t])
        grams = {tuple(prefix[i : i + n]) for i in range(len(prefix) - n + 1)}
        for tok in range(v):
          new = tuple((prefix + [tok])[-n:])
          banned = len(prefix) + 1 >= n and new in grams
          assert got[r, tok] == (not banned), (n, t, r, tok)
