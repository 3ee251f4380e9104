"""RSO statistical rejection sampling: limits in beta, the tilted distribution, masks."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.preference import rejection_sampling as rs


def test_beta_to_zero_gives_top_m_in_reward_order():
  rewards = jnp.array([[0.3, 2.0, -1.0, 1.5, 0.9, 1.4], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
  for seed in range(3):
    acc, count = rs.rso_sample(
      jax.random.PRNGKey(seed), rewards, jnp.ones_like(rewards), num_accept=3, beta=1e-6
    )
    np.testing.assert_array_equal(acc, [[1, 3, 5], [0, 1, 2]])
    np.testing.assert_array_equal(count, [3, 3])


def test_beta_to_infinity_gives_uniform_subsets():
  b, n, m = 4000, 8, 2
  rewards = jnp.tile(jnp.linspace(-3.0, 3.0, n)[None], (b, 1))
  acc, count = rs.rso_sample(
    jax.random.PRNGKey(0), rewards, jnp.ones((b, n)), num_accept=m, beta=float("inf")
  )
  acc = np.asarray(acc)
  np.testing.assert_array_equal(count, m)
  assert np.all(acc[:, 0] != acc[:, 1])  # without replacement
  # Each index accepted with probability m/n = 0.25 (s.e. 0.007), first pick 1/8 (s.e. 0.005).
  included = np.stack([(acc == i).any(-1).mean() for i in range(n)])
  first = np.bincount(acc[:, 0], minlength=n) / b
  np.testing.assert_allclose(included, m / n, atol=0.035)
  np.testing.assert_allclose(first, 1 / n, atol=0.025)


def test_first_accepted_follows_tilted_distribution():
  # pi_sft over 4 outputs with rewards r; accepted samples should follow pi_sft * exp(r / beta).
  pi_sft = np.array([0.1, 0.2, 0.3, 0.4])
  r = np.array([0.0, 0.3, 0.6, 0.9])
  beta = 0.5
  b, n = 20000, 64
  types = jax.random.categorical(jax.random.PRNGKey(1), jnp.log(jnp.asarray(pi_sft)), shape=(b, n))
  rewards = jnp.asarray(r, jnp.float32)[types]
  acc, _ = rs.rso_sample(jax.random.PRNGKey(2), rewards, jnp.ones((b, n)), num_accept=1, beta=beta)
  first_type = np.asarray(jnp.take_along_axis(types, acc[:, :1], axis=1)[:, 0])
  freq = np.bincount(first_type, minlength=4) / b
  tilted = pi_sft * np.exp(r / beta)
  tilted /= tilted.sum()
  # By hand: weights 0.1, 0.2e^0.6, 0.3e^1.2, 0.4e^1.8 -> (0.0258, 0.0939, 0.2567, 0.6236).
  np.testing.assert_allclose(tilted, [0.0258, 0.0939, 0.2567, 0.6236], atol=5e-4)
  se = np.sqrt(tilted * (1 - tilted) / b)
  assert np.all(np.abs(freq - tilted) < 5 * se), (freq, tilted)
  # ... and clearly not the untilted SFT distribution.
  assert np.abs(freq - pi_sft).max() > 0.1


def test_masked_candidates_never_accepted_and_short_rows_padded():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(50, 10)).astype(np.float32)
  mask = rng.random((50, 10)) > 0.5
  rewards = np.where(mask, rewards, 100.0)  # masked ones would win every draw if counted
  mask[0] = False
  mask[1] = False
  mask[1, 7] = True
  acc, count = rs.rso_sample(jax.random.PRNGKey(0), rewards, mask, num_accept=4, beta=0.5)
  acc, count = np.asarray(acc), np.asarray(count)
  np.testing.assert_array_equal(count, np.minimum(mask.sum(-1), 4))
  for row in range(50):
    got = acc[row][acc[row] >= 0]
    assert len(got) == count[row] and len(set(got)) == len(got)
    assert mask[row, got].all()
    assert np.all(acc[row, count[row] :] == -1)
  np.testing.assert_array_equal(acc[0], [-1, -1, -1, -1])
  np.testing.assert_array_equal(acc[1], [7, -1, -1, -1])


def test_max_rounds_limits_acceptances_and_jit():
  rewards = jnp.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
  f = jax.jit(functools.partial(rs.rso_sample, num_accept=4, beta=1e-6, max_rounds=2))
  acc, count = f(jax.random.PRNGKey(0), rewards, jnp.ones((1, 5)))
  # beta -> 0 accepts exactly one candidate (the best remaining) per round.
  np.testing.assert_array_equal(acc, [[4, 3, -1, -1]])
  np.testing.assert_array_equal(count, [2])


def test_expected_acceptance_rate_hand_values_and_empirical():
  rewards = jnp.array([[0.0, 1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  rate = rs.expected_acceptance_rate(rewards, mask, beta=0.5)
  # Row 0: r_max = 2 (9 is masked): (e^-4 + e^-2 + 1) / 3.
  want0 = (math.exp(-4) + math.exp(-2) + 1) / 3
  np.testing.assert_allclose(rate, [want0, 1.0], rtol=1e-5)
  # Empirically: with M = N and one round, the mean acceptance count / N is the rate.
  b = 4000
  big = jnp.tile(rewards[:1], (b, 1))
  _, count = rs.rso_sample(
    jax.random.PRNGKey(3), big, jnp.tile(mask[:1], (b, 1)), num_accept=4, beta=0.5, max_rounds=1
  )
  assert abs(float(jnp.mean(count)) / 3 - want0) < 0.02


def test_errors():
  r = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="beta"):
    rs.rso_sample(jax.random.PRNGKey(0), r, jnp.ones((2, 3)), num_accept=1, beta=0.0)
  with pytest.raises(ValueError, match=r"\[B, N\]"):
    rs.rso_sample(jax.random.PRNGKey(0), r, jnp.ones((2, 4)), num_accept=1, beta=1.0)
  with pytest.raises(ValueError, match="num_accept"):
    rs.rso_sample(jax.random.PRNGKey(0), r, jnp.ones((2, 3)), num_accept=0, beta=1.0)
