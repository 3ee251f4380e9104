"""Pair labeling: single-elimination tournament and first-round random pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.preference import ranking

SCORES = jnp.array([[3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]])


def test_tournament_hand_bracket_with_scores():
  chosen, rejected = ranking.tournament_pairs(SCORES)
  # Round 1: (0 v 1) 0, (2 v 3) 2, (4 v 5) 5, (6 v 7) 7; round 2: (0 v 2) 2, (5 v 7) 5;
  # final: (2 v 5) 5.
  np.testing.assert_array_equal(chosen, [[0, 2, 5, 7, 2, 5, 5]])
  np.testing.assert_array_equal(rejected, [[1, 3, 4, 6, 0, 7, 2]])


def test_tournament_with_byes_for_five_candidates():
  scores = jnp.array([[2.0, 7.0, 1.0, 3.0, 5.0]])
  chosen, rejected = ranking.tournament_pairs(scores)
  # Round 1: (0 v 1) 1, (2 v 3) 3, 4 has a bye; round 2: (1 v 3) 1, 4 has a bye;
  # final: (1 v 4) 1.  M - 1 = 4 pairs.
  np.testing.assert_array_equal(chosen, [[1, 3, 1, 1]])
  np.testing.assert_array_equal(rejected, [[0, 2, 3, 4]])


def test_tournament_pref_matrix_non_transitive_and_matches_scores():
  # Rock (0) beats scissors (2), scissors beats paper (1), paper beats rock; 3 loses to all.
  p = np.full((4, 4), 0.5)
  for w, l_ in [(0, 2), (2, 1), (1, 0), (0, 3), (1, 3), (2, 3)]:
    p[w, l_], p[l_, w] = 0.8, 0.2
  chosen, rejected = ranking.tournament_pairs(jnp.asarray(p)[None])
  # Round 1: (0 v 1) paper 1 wins, (2 v 3) 2 wins; final (1 v 2) scissors 2 wins.
  np.testing.assert_array_equal(chosen, [[1, 2, 2]])
  np.testing.assert_array_equal(rejected, [[0, 3, 1]])
  # A preference matrix derived from scores (Bradley-Terry) gives the same pairs as the scores.
  s = SCORES
  bt = jax.nn.sigmoid(s[:, :, None] - s[:, None, :])
  for a, b in zip(ranking.tournament_pairs(bt), ranking.tournament_pairs(s)):
    np.testing.assert_array_equal(a, b)


def test_tournament_with_compare_function_and_position_bias():
  calls = []

  def compare(left, right):
    calls.append(left.shape)
    s = SCORES[0]
    return jax.nn.sigmoid(s[left] - s[right])

  got = ranking.tournament_pairs(compare, mask_BxM=jnp.ones((1, 8)))
  for a, b in zip(got, ranking.tournament_pairs(SCORES)):
    np.testing.assert_array_equal(a, b)
  assert calls == [(1, 4), (1, 2), (1, 1)]  # one batched call per round
  # An order-biased matrix (P(A wins) = 0.6 whichever is A) is symmetrized: every match ties.
  biased = jnp.full((1, 4, 4), 0.6)
  chosen, rejected = ranking.tournament_pairs(biased)
  np.testing.assert_array_equal(chosen, -1)
  np.testing.assert_array_equal(rejected, -1)


def test_tournament_masks_and_ties():
  scores = jnp.array([[3.0, 10.0, 3.0, 1.0]])
  mask = jnp.array([[1, 0, 1, 1]])
  chosen, rejected = ranking.tournament_pairs(scores, mask_BxM=mask)
  # (0 v 1): 1 masked -> no pair, 0 advances; (2 v 3) 2; final (0 v 2) tie -> no pair.
  np.testing.assert_array_equal(chosen, [[-1, 2, -1]])
  np.testing.assert_array_equal(rejected, [[-1, 3, -1]])


def test_random_bracket_properties():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(np.stack([rng.permutation(16) for _ in range(6)]) + 0.0)
  chosen, rejected = ranking.tournament_pairs(scores, rng=jax.random.PRNGKey(0))
  chosen, rejected, s = np.asarray(chosen), np.asarray(rejected), np.asarray(scores)
  assert chosen.shape == (6, 15)
  for b in range(6):
    best = int(np.argmax(s[b]))
    assert chosen[b, -1] == best  # the final is won by the best candidate
    assert sorted(rejected[b]) == sorted(set(range(16)) - {best})  # everyone else loses once
    assert np.all(s[b, chosen[b]] > s[b, rejected[b]])
  # Different keys give different brackets.
  other, _ = ranking.tournament_pairs(scores, rng=jax.random.PRNGKey(1))
  assert not np.array_equal(np.asarray(other), chosen)


def test_first_round_pairs():
  rng = np.random.default_rng(1)
  scores = jnp.asarray(np.stack([rng.permutation(8) for _ in range(5)]) + 0.0)
  seen = set()
  for seed in range(20):
    chosen, rejected = ranking.first_round_pairs(scores, rng=jax.random.PRNGKey(seed))
    chosen, rejected, s = np.asarray(chosen), np.asarray(rejected), np.asarray(scores)
    assert chosen.shape == (5, 4)
    for b in range(5):
      assert sorted(np.concatenate([chosen[b], rejected[b]])) == list(range(8))  # disjoint
      assert np.all(s[b, chosen[b]] > s[b, rejected[b]])
    seen.update(tuple(sorted(p)) for p in zip(chosen[0], rejected[0]))
  assert len(seen) > 15  # pairings are random (28 possible pairs)
  # Odd M: floor(M/2) pairs; ties and masked candidates give -1.
  chosen, rejected = ranking.first_round_pairs(
    jnp.array([[1.0, 1.0, 1.0]]), rng=jax.random.PRNGKey(0)
  )
  np.testing.assert_array_equal(chosen, [[-1]])
  chosen, _ = ranking.first_round_pairs(
    jnp.array([[1.0, 2.0]]), rng=jax.random.PRNGKey(0), mask_BxM=jnp.array([[1, 0]])
  )
  np.testing.assert_array_equal(chosen, [[-1]])


def test_jit_and_errors():
  f = jax.jit(lambda s, k: ranking.tournament_pairs(s, rng=k))
  chosen, _ = f(SCORES, jax.random.PRNGKey(0))
  assert chosen.shape == (1, 7) and int(chosen[0, -1]) == 5
  with pytest.raises(ValueError, match="mask_BxM"):
    ranking.tournament_pairs(lambda a, b: a > b)
  with pytest.raises(ValueError, match="rng"):
    ranking.first_round_pairs(SCORES, rng=None)
  with pytest.raises(ValueError, match="at least 2"):
    ranking.tournament_pairs(SCORES[:, :1])
  with pytest.raises(ValueError, match="shape"):
    ranking.tournament_pairs(jnp.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match="mask_BxM"):
    ranking.tournament_pairs(SCORES, mask_BxM=jnp.ones((1, 3)))
