"""Regularizers: cross-entropy, exact token KL, top-k stored KL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from slicjax.losses import regularizers

# One example, three positions, V = 3; the third position is padding.
REF_P = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]])
POL_P = np.array([[[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.05, 0.05, 0.9]]])
# Logits are log-probs shifted by arbitrary per-position constants (softmax must undo them).
REF_LOGITS = jnp.asarray(np.log(REF_P) + np.array([[[1.0], [-2.0], [0.5]]]), jnp.float32)
POL_LOGITS = jnp.asarray(np.log(POL_P) + np.array([[[3.0], [0.7], [-1.0]]]), jnp.float32)
MASK = jnp.array([[1, 1, 0]])


def test_cross_entropy_hand_values():
  token_logp = jnp.array([[-0.5, -1.0, -2.0], [-0.3, -0.7, -9.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(
    regularizers.cross_entropy_regularizer(token_logp, mask), [1.5, 10.0], rtol=1e-6
  )
  g = jax.grad(lambda t: jnp.sum(regularizers.cross_entropy_regularizer(t, mask)))(token_logp)
  np.testing.assert_array_equal(g, -np.asarray(mask, np.float32))


def test_kl_hand_values():
  # Position 0: 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.223804
  # Position 1: 2 * 0.1 ln(0.3) + 0.8 ln(2.4) = 0.459581; position 2 is masked out.
  kl0 = 0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3)
  kl1 = 0.2 * math.log(0.3) + 0.8 * math.log(2.4)
  assert abs(kl0 - 0.223804) < 1e-6 and abs(kl1 - 0.459581) < 1e-6
  got = regularizers.kl_regularizer(POL_LOGITS, REF_LOGITS, MASK)
  np.testing.assert_allclose(got, [kl0 + kl1], rtol=1e-5)
  # Masked position's logits do not matter.
  other = POL_LOGITS.at[0, 2].set(jnp.array([9.0, -9.0, 0.0]))
  np.testing.assert_allclose(regularizers.kl_regularizer(other, REF_LOGITS, MASK), got, rtol=1e-6)
  # Direction: KL(P_ft || P_theta), not the reverse.
  rev = regularizers.kl_regularizer(REF_LOGITS, POL_LOGITS, MASK)
  assert abs(float(rev[0]) - float(got[0])) > 1e-2


def test_kl_matches_numpy_on_random_batch_and_is_zero_at_reference():
  rng = np.random.default_rng(0)
  pol = rng.normal(size=(3, 4, 7)) * 2
  ref = rng.normal(size=(3, 4, 7)) * 2
  mask = (rng.random((3, 4)) > 0.3).astype(np.float32)
  lp = pol - np.log(np.exp(pol).sum(-1, keepdims=True))
  lq = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  want = ((np.exp(lq) * (lq - lp)).sum(-1) * mask).sum(-1)
  got = regularizers.kl_regularizer(jnp.asarray(pol), jnp.asarray(ref), mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    regularizers.kl_regularizer(jnp.asarray(ref), jnp.asarray(ref), mask), 0.0, atol=1e-5
  )


def test_kl_gradients():
  f = lambda pol: jnp.sum(regularizers.kl_regularizer(pol, REF_LOGITS, MASK))
  check_grads(f, (POL_LOGITS,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)
  # d KL / d policy logits = p_theta - p_ft on unmasked positions; reference gets no gradient.
  g_pol, g_ref = jax.grad(
    lambda p, r: jnp.sum(regularizers.kl_regularizer(p, r, MASK)), argnums=(0, 1)
  )(POL_LOGITS, REF_LOGITS)
  want = (POL_P - REF_P) * np.array([[[1.0], [1.0], [0.0]]])
  np.testing.assert_allclose(g_pol, want, atol=1e-5)
  np.testing.assert_array_equal(g_ref, 0.0)


def test_topk_logprobs_hand_values():
  vals, ids = regularizers.topk_logprobs(REF_LOGITS, 2)
  np.testing.assert_array_equal(ids, [[[0, 1], [2, 0], [0, 1]]])
  np.testing.assert_allclose(vals[0, 0], np.log([0.5, 0.3]), rtol=1e-5)
  np.testing.assert_allclose(vals[0, 1], np.log([0.8, 0.1]), rtol=1e-5)
  assert ids.dtype == jnp.int32
  with pytest.raises(ValueError, match="k must be"):
    regularizers.topk_logprobs(REF_LOGITS, 4)


def test_topk_kl_hand_values():
  vals, ids = regularizers.topk_logprobs(REF_LOGITS, 2)
  # Position 0: top-2 {0: 0.5, 1: 0.3} renormalized to (0.625, 0.375) against (0.2, 0.5):
  #   0.625 ln(0.625/0.2) + 0.375 ln(0.375/0.5) = 0.604265
  # Position 1: top-2 {2: 0.8, 0: 0.1} -> (8/9, 1/9) against (1/3, 1/3):
  #   8/9 ln(8/3) + 1/9 ln(1/3) = 0.749780
  k0 = 0.625 * math.log(0.625 / 0.2) + 0.375 * math.log(0.75)
  k1 = 8 / 9 * math.log(8 / 3) + 1 / 9 * math.log(1 / 3)
  assert abs(k0 - 0.604265) < 1e-6 and abs(k1 - 0.749780) < 1e-6
  got = regularizers.kl_regularizer_topk(POL_LOGITS, vals, ids, MASK)
  np.testing.assert_allclose(got, [k0 + k1], rtol=1e-5)


def test_topk_with_k_equal_v_is_exact_kl():
  rng = np.random.default_rng(1)
  pol = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  ref = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 5)) > 0.4)
  vals, ids = regularizers.topk_logprobs(ref, 6)
  np.testing.assert_allclose(
    regularizers.kl_regularizer_topk(pol, vals, ids, mask),
    regularizers.kl_regularizer(pol, ref, mask),
    rtol=1e-5,
    atol=1e-6,
  )


def test_topk_gradients_and_errors():
  vals, ids = regularizers.topk_logprobs(REF_LOGITS, 2)
  f = lambda pol: jnp.sum(regularizers.kl_regularizer_topk(pol, vals, ids, MASK))
  check_grads(f, (POL_LOGITS,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)
  with pytest.raises(ValueError, match="same"):
    regularizers.kl_regularizer_topk(POL_LOGITS, vals, ids[..., :1], MASK)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    regularizers.kl_regularizer_topk(POL_LOGITS[:, :2], vals, ids, MASK)
  with pytest.raises(ValueError, match="mask"):
    regularizers.kl_regularizer(POL_LOGITS, REF_LOGITS, MASK[:, :2])
  with pytest.raises(ValueError, match="same"):
    regularizers.kl_regularizer(POL_LOGITS, REF_LOGITS[..., :2], MASK)
