"""SLiC calibration losses: hand-computed values, masks, ties, gradients."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from slicjax.losses import calibration

# Row 0: candidate 3 is padding (it has the best logp and the worst sim: counting it would change
# every loss). Row 1: three candidates tie at sim 0.3. Row 2: all tie. Row 3: one valid candidate.
LOGP = jnp.array(
  [
    [-2.0, -1.0, -3.0, -0.5],
    [-0.2, -2.5, -0.7, -4.0],
    [-1.0, -2.0, -3.0, -4.0],
    [-1.0, -2.0, -3.0, -4.0],
  ]
)
SIM = jnp.array(
  [
    [0.9, 0.4, 0.7, 0.1],
    [0.3, 0.3, 0.8, 0.3],
    [0.5, 0.5, 0.5, 0.5],
    [0.9, 0.1, 0.2, 0.3],
  ]
)
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_rank_best_worst_hand_values():
  loss, count = calibration.rank_loss(LOGP, SIM, MASK, beta=0.5, pairs="best_worst")
  # row 0: best idx0 (0.9), worst valid idx1 (0.4): 0.5 - (-2.0) + (-1.0) = 1.5
  # row 1: best idx2 (0.8), worst idx0 (first of the 0.3 ties): 0.5 - (-0.7) + (-0.2) = 1.0
  np.testing.assert_allclose(loss, [1.5, 1.0, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(count, [1, 1, 0, 0])


def test_rank_all_pairs_hand_values():
  loss, count = calibration.rank_loss(LOGP, SIM, MASK, beta=0.5, pairs="all")
  # row 0 pairs (0,1): 1.5, (0,2): 0.5+2-3 = -0.5 -> 0, (2,1): 0.5+3-1 = 2.5; mean 4/3
  # row 1 pairs (2,0): 1.0, (2,1): 0.5+0.7-2.5 -> 0, (2,3): 0.5+0.7-4.0 -> 0; mean 1/3
  np.testing.assert_allclose(loss, [4.0 / 3.0, 1.0 / 3.0, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(count, [3, 3, 0, 0])


def test_margin_loss_hand_values():
  loss, count = calibration.margin_loss(LOGP, SIM, MASK, beta=2.0, pairs="best_worst")
  # row 0: margin 2*(0.9-0.4) = 1.0; 1.0 + 2.0 - 1.0 = 2.0
  # row 1: margin 2*(0.8-0.3) = 1.0; 1.0 + 0.7 - 0.2 = 1.5
  np.testing.assert_allclose(loss, [2.0, 1.5, 0.0, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(count, [1, 1, 0, 0])
  loss, _ = calibration.margin_loss(LOGP, SIM, MASK, beta=2.0, pairs="all")
  # row 0: (0,1) 1.0+2-1 = 2.0; (0,2) 0.4+2-3 -> 0; (2,1) 0.6+3-1 = 2.6 -> mean 4.6/3
  np.testing.assert_allclose(loss[0], 4.6 / 3.0, rtol=1e-5)


def test_list_rank_hand_values():
  loss, count = calibration.list_rank_loss(LOGP, SIM, MASK, beta=1.5)
  # row 0 sorted: idx0 (pos 0), idx2 (pos 1), idx1 (pos 2); padding idx3 takes no position.
  #   (0,2) gap 1: 1.5+2-3 = 0.5; (0,1) gap 2: 3+2-1 = 4.0; (2,1) gap 1: 1.5+3-1 = 3.5 -> 8.0
  # row 1 sorted (stable): idx2, idx0, idx1, idx3; tied pairs skipped.
  #   (2,0) gap 1: 1.5+0.7-0.2 = 2.0; (2,1) gap 2: 3+0.7-2.5 = 1.2; (2,3) gap 3: 4.5+0.7-4 = 1.2
  np.testing.assert_allclose(loss, [8.0, 4.4, 0.0, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(count, [3, 3, 0, 0])


def test_expected_reward_hand_values():
  loss, count = calibration.expected_reward_loss(LOGP, SIM, MASK)
  e = [math.exp(-2.0), math.exp(-1.0), math.exp(-3.0)]
  row0 = -(0.9 * e[0] + 0.4 * e[1] + 0.7 * e[2]) / sum(e)
  assert abs(row0 - (-0.549373)) < 1e-5  # the hand arithmetic itself
  e1 = [math.exp(v) for v in (-0.2, -2.5, -0.7, -4.0)]
  row1 = -(0.3 * (e1[0] + e1[1] + e1[3]) + 0.8 * e1[2]) / sum(e1)
  np.testing.assert_allclose(loss, [row0, row1, -0.5, -0.9], rtol=1e-5)
  np.testing.assert_array_equal(count, [3, 3, 0, 0])


def _list_rank_reference(logp, sim, mask, beta):
  """Independent: explicit sort of the valid candidates, then the BRIO double loop."""
  out = []
  for lp, s, m in zip(logp, sim, mask):
    items = [(s[i], lp[i]) for i in range(len(lp)) if m[i]]
    items = sorted(items, key=lambda t: -t[0])  # Python's sort is stable
    total = 0.0
    for i, j in itertools.combinations(range(len(items)), 2):
      if items[i][0] > items[j][0]:
        total += max(0.0, beta * (j - i) - items[i][1] + items[j][1])
    out.append(total)
  return np.array(out)


def test_list_rank_matches_brute_force_with_ties_and_masks():
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(6, 5)) * 2
  sim = rng.integers(0, 3, size=(6, 5)).astype(np.float32) / 2  # many ties
  mask = rng.random((6, 5)) > 0.3
  got, _ = calibration.list_rank_loss(jnp.asarray(logp), jnp.asarray(sim), mask, beta=0.7)
  want = _list_rank_reference(logp, sim, mask, 0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_random_pairs_are_uniform_over_strictly_ordered_valid_pairs():
  # beta=2 on row 0 gives distinct hinges per valid pair: (0,1) 3, (0,2) 1, (2,1) 4.
  b = 600
  logp = jnp.tile(LOGP[:1], (b, 1))
  sim = jnp.tile(SIM[:1], (b, 1))
  mask = jnp.tile(MASK[:1], (b, 1))
  loss, count = calibration.rank_loss(
    logp, sim, mask, beta=2.0, pairs="random", rng=jax.random.PRNGKey(3)
  )
  loss = np.asarray(loss)
  assert set(np.round(loss, 4)) == {1.0, 3.0, 4.0}
  for v in (1.0, 3.0, 4.0):
    assert abs(np.mean(np.isclose(loss, v)) - 1 / 3) < 0.08
  np.testing.assert_array_equal(count, 1)
  # Ties and single candidates still yield no pair under random selection.
  loss, count = calibration.rank_loss(
    LOGP[2:], SIM[2:], MASK[2:], beta=2.0, pairs="random", rng=jax.random.PRNGKey(0)
  )
  np.testing.assert_array_equal(loss, [0.0, 0.0])
  np.testing.assert_array_equal(count, [0, 0])


def test_masked_entries_may_hold_garbage():
  logp = LOGP.at[0, 3].set(-jnp.inf)
  sim = SIM.at[0, 3].set(jnp.nan)
  for fn in (
    lambda lp, s: calibration.rank_loss(lp, s, MASK, beta=0.5, pairs="all")[0],
    lambda lp, s: calibration.margin_loss(lp, s, MASK, beta=0.5, pairs="best_worst")[0],
    lambda lp, s: calibration.list_rank_loss(lp, s, MASK, beta=0.5)[0],
    lambda lp, s: calibration.expected_reward_loss(lp, s, MASK)[0],
  ):
    np.testing.assert_allclose(fn(logp, sim), fn(LOGP, SIM), rtol=1e-6)
    g = jax.grad(lambda lp, fn=fn: jnp.sum(fn(lp, sim)))(logp)
    assert np.all(np.isfinite(g))
    assert g[0, 3] == 0.0


def test_rank_gradient_raises_positive_lowers_negative():
  g = jax.grad(lambda lp: jnp.sum(calibration.rank_loss(lp, SIM, MASK, beta=0.5, pairs="all")[0]))(
    LOGP
  )
  step = -np.asarray(g)  # gradient-descent direction
  # row 0: active pairs (0,1) and (2,1): idx0, idx2 go up, idx1 goes down, padding untouched.
  assert step[0, 0] > 0 and step[0, 2] > 0 and step[0, 1] < 0 and step[0, 3] == 0
  np.testing.assert_allclose(step[0], [1 / 3, -2 / 3, 1 / 3, 0.0], rtol=1e-6)
  # row 1: the only active pair is (2, 0).
  np.testing.assert_allclose(step[1], [-1 / 3, 0.0, 1 / 3, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(step[2:], 0.0)


@pytest.mark.parametrize(
  "fn",
  [
    lambda lp: calibration.rank_loss(lp, SIM, MASK, beta=0.5, pairs="all")[0],
    lambda lp: calibration.rank_loss(lp, SIM, MASK, beta=0.5, pairs="best_worst")[0],
    lambda lp: calibration.margin_loss(lp, SIM, MASK, beta=2.0, pairs="all")[0],
    lambda lp: calibration.list_rank_loss(lp, SIM, MASK, beta=1.5)[0],
    lambda lp: calibration.expected_reward_loss(lp, SIM, MASK)[0],
  ],
)
def test_gradients_match_finite_differences(fn):
  # All hinges at LOGP are at least 0.2 away from their kink, larger than the FD step.
  check_grads(
    lambda lp: jnp.sum(fn(lp) * jnp.arange(1.0, 5.0)),
    (LOGP,),
    order=1,
    modes=("rev",),
    eps=1e-2,
    atol=2e-2,
    rtol=2e-2,
  )


def test_random_pairs_under_jit_and_errors():
  f = jax.jit(lambda lp, k: calibration.rank_loss(lp, SIM, MASK, beta=0.5, pairs="random", rng=k))
  loss, count = f(LOGP, jax.random.PRNGKey(1))
  assert loss.shape == (4,) and count.dtype == jnp.int32
  with pytest.raises(ValueError, match="rng"):
    calibration.rank_loss(LOGP, SIM, MASK, pairs="random")
  with pytest.raises(ValueError, match="pairs"):
    calibration.rank_loss(LOGP, SIM, MASK, pairs="worst", rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="same"):
    calibration.list_rank_loss(LOGP, SIM[:, :3], MASK)
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    calibration.expected_reward_loss(LOGP[0], SIM[0], MASK[0])
  with pytest.raises(ValueError, match="beta"):
    calibration.margin_loss(LOGP, SIM, MASK, beta=-1.0, pairs="all")
