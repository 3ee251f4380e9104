"""Preference losses: hand-computed values at beta != 1 with policy != reference, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from slicjax.losses import preference

# Example 0: Δw = -3 - (-4) = 1.0, Δl = -5 - (-4.5) = -0.5, h = 1.5.
# Example 1: Δw = -6 - (-5) = -1.0, Δl = -2 - (-2.5) = 0.5, h = -1.5.
PW = jnp.array([-3.0, -6.0])
PL = jnp.array([-5.0, -2.0])
RW = jnp.array([-4.0, -5.0])
RL = jnp.array([-4.5, -2.5])


def softplus(x):
  return math.log1p(math.exp(x))


def test_dpo_hand_values_beta_02():
  loss = preference.sigmoid_norm_loss(PW, PL, RW, RL, beta=0.2)
  # -log σ(0.2 * 1.5) = log(1 + e^-0.3) = 0.554355; -log σ(-0.3) = log(1 + e^0.3) = 0.854355
  assert abs(softplus(-0.3) - 0.554355) < 1e-6 and abs(softplus(0.3) - 0.854355) < 1e-6
  np.testing.assert_allclose(loss, [0.554355, 0.854355], rtol=1e-5)
  # A β of 1 would give log(1 + e^-1.5) = 0.201413 instead: the test sees a wrong β.
  assert abs(float(loss[0]) - softplus(-1.5)) > 0.3
  assert preference.dpo_loss is preference.sigmoid_norm_loss


def test_dpo_label_smoothing_hand_values():
  loss = preference.sigmoid_norm_loss(PW, PL, RW, RL, beta=0.2, label_smoothing=0.1)
  # 0.9 * 0.554355 + 0.1 * 0.854355 = 0.584355 and 0.9 * 0.854355 + 0.1 * 0.554355 = 0.824355
  np.testing.assert_allclose(loss, [0.584355, 0.824355], rtol=1e-5)


def test_dpo_equal_policy_and_reference_is_log2():
  loss = preference.sigmoid_norm_loss(RW, RL, RW, RL, beta=0.3)
  np.testing.assert_allclose(loss, [math.log(2.0)] * 2, rtol=1e-6)


def test_dpo_gradient_closed_form_and_reference_stopped():
  beta = 0.2
  g = jax.grad(
    lambda pw, rw: jnp.sum(preference.sigmoid_norm_loss(pw, PL, rw, RL, beta=beta)), argnums=(0, 1)
  )(PW, RW)
  # dL/dpw = -β σ(-βh)
  sig = lambda x: 1.0 / (1.0 + math.exp(-x))
  np.testing.assert_allclose(g[0], [-beta * sig(-0.3), -beta * sig(0.3)], rtol=1e-5)
  np.testing.assert_array_equal(g[1], 0.0)


def test_hinge_hand_values():
  loss = preference.hinge_loss(jnp.array([-3.0, -2.0]), jnp.array([-4.0, -6.0]), gamma=0.5)
  # max(0, 1 - 0.5 * 1) = 0.5;  max(0, 1 - 0.5 * 4) = 0
  np.testing.assert_allclose(loss, [0.5, 0.0])
  loss = preference.hinge_loss(jnp.array([-3.0]), jnp.array([-4.0]), gamma=0.25, delta=2.0)
  np.testing.assert_allclose(loss, [1.75])  # 2 - 0.25


def test_hinge_norm_hand_values():
  loss = preference.hinge_norm_loss(PW, PL, RW, RL, gamma=0.5)
  # max(0, 1 - 0.5 * 1.5) = 0.25; max(0, 1 + 0.75) = 1.75
  np.testing.assert_allclose(loss, [0.25, 1.75], rtol=1e-6)


def test_ipo_hand_values():
  loss = preference.ipo_loss(PW, PL, RW, RL, jnp.array([4, 2]), jnp.array([5, 10]), beta=0.25)
  # 1/(2β) = 2. Ex 0: (1/4 - (-0.5)/5 - 2)^2 = (-1.65)^2 = 2.7225
  # Ex 1: (-1/2 - 0.5/10 - 2)^2 = (-2.55)^2 = 6.5025
  np.testing.assert_allclose(loss, [2.7225, 6.5025], rtol=1e-5)


def test_ipo_sequence_level_hand_values():
  loss = preference.ipo_loss(PW, PL, RW, RL, jnp.array([4, 2]), jnp.array([5, 10]), beta=0.25,
                             length_normalize=False)
  # Δw - Δl - 1/(2β): ex 0: 1 - (-0.5) - 2 = -0.5 -> 0.25; ex 1: -1 - 0.5 - 2 = -3.5 -> 12.25
  np.testing.assert_allclose(loss, [0.25, 12.25], rtol=1e-6)


def test_slic_hf_hand_values():
  loss = preference.slic_hf_loss(
    jnp.array([-3.0, -2.0]), jnp.array([-3.5, -6.0]), jnp.array([-2.0, -4.0]), reg_weight=0.5
  )
  # max(0, 1 + 3 - 3.5) + 0.5 * 2 = 1.5;  max(0, 1 + 2 - 6) + 0.5 * 4 = 2.0
  np.testing.assert_allclose(loss, [1.5, 2.0], rtol=1e-6)


def test_preference_metrics_hand_values():
  m = preference.preference_metrics(PW, PL, RW, RL, beta=0.2)
  np.testing.assert_allclose(m["chosen_reward"], [0.2, -0.2], rtol=1e-5)
  np.testing.assert_allclose(m["rejected_reward"], [-0.1, 0.1], rtol=1e-5)
  np.testing.assert_allclose(m["margin"], [0.3, -0.3], rtol=1e-5)
  np.testing.assert_array_equal(m["accuracy"], [1.0, 0.0])


@pytest.mark.parametrize(
  "fn",
  [
    lambda pw, pl: preference.sigmoid_norm_loss(pw, pl, RW, RL, beta=0.2, label_smoothing=0.1),
    lambda pw, pl: preference.hinge_loss(pw, pl, gamma=0.5, delta=4.0),
    lambda pw, pl: preference.hinge_norm_loss(pw, pl, RW, RL, gamma=0.5),
    lambda pw, pl: preference.ipo_loss(
      pw, pl, RW, RL, jnp.array([4.0, 2.0]), jnp.array([5.0, 10.0]), beta=0.25
    ),
    lambda pw, pl: preference.slic_hf_loss(pw, pl, pw + 0.5, delta=6.0, reg_weight=0.5),
  ],
)
def test_gradients_match_finite_differences(fn):
  check_grads(
    lambda pw, pl: jnp.sum(fn(pw, pl) * jnp.array([1.0, 2.0])),
    (PW, PL),
    order=1,
    modes=("rev",),
    eps=1e-2,
    atol=2e-2,
    rtol=2e-2,
  )


def test_hinge_gradient_raises_chosen_lowers_rejected():
  g = jax.grad(
    lambda pw, pl: jnp.sum(preference.hinge_norm_loss(pw, pl, RW, RL, gamma=0.5)), argnums=(0, 1)
  )(PW, PL)
  np.testing.assert_allclose(g[0], [-0.5, -0.5])
  np.testing.assert_allclose(g[1], [0.5, 0.5])


def test_errors():
  with pytest.raises(ValueError, match="shape"):
    preference.sigmoid_norm_loss(PW, PL[:1], RW, RL)
  with pytest.raises(ValueError, match="label_smoothing"):
    preference.sigmoid_norm_loss(PW, PL, RW, RL, label_smoothing=0.5)
  with pytest.raises(ValueError, match="beta"):
    preference.sigmoid_norm_loss(PW, PL, RW, RL, beta=0.0)
  with pytest.raises(ValueError, match="chosen_len"):
    preference.ipo_loss(PW, PL, RW, RL, jnp.array([0, 3]), jnp.array([2, 3]))
  with pytest.raises(ValueError, match="gamma"):
    preference.hinge_loss(PW, PL, gamma=-1.0)
  with pytest.raises(ValueError, match="reg_weight"):
    preference.slic_hf_loss(PW, PL, PW, reg_weight=-1.0)
  # Under jit the length check is skipped (traced) but the loss still computes.
  out = jax.jit(lambda a, b: preference.ipo_loss(PW, PL, RW, RL, a, b, beta=0.25))(
    jnp.array([4, 2]), jnp.array([5, 10])
  )
  np.testing.assert_allclose(out, [2.7225, 6.5025], rtol=1e-5)
