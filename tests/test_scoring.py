"""Scoring: sequence log-likelihoods against hand-computed token log-probs, with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax import scoring
from slicjax.models.factory import build_model


def test_token_and_sequence_logprob_by_hand():
  # Two positions, vocab 3. logits row 0 = [0, ln 2, ln 3] -> probs [1/6, 2/6, 3/6].
  logits = jnp.array([[[0.0, np.log(2.0), np.log(3.0)], [np.log(4.0), 0.0, 0.0]]])
  targets = jnp.array([[2, 0]])
  tok = scoring.token_logprobs(logits, targets)
  np.testing.assert_allclose(tok, [[np.log(3 / 6), np.log(4 / 6)]], rtol=1e-6)
  mask = jnp.array([[1.0, 0.0]])  # padding removes the second token
  np.testing.assert_allclose(scoring.sequence_logprob(tok, mask), [np.log(0.5)], rtol=1e-6)
  np.testing.assert_allclose(
    scoring.sequence_logprob(tok, jnp.ones((1, 2)), normalize=True),
    [(np.log(0.5) + np.log(4 / 6)) / 2], rtol=1e-6,
  )


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="does not match"):
    scoring.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("encdec", [False, True])
def test_model_scores_equal_manual_sum_and_padding_removes_tokens(encdec):
  model = build_model(dict(preset="tiny", vocab_size=24, max_len=32,
                           num_encoder_layers=1 if encdec else 0))
  params = model.init(jax.random.PRNGKey(0))
  batch = dict(inputs=jnp.array([[5, 6, 0], [7, 8, 9]]), targets=jnp.array([[10, 1, 0], [11, 12, 1]]))
  out = scoring.score_targets(model, params, batch)
  logp = jax.nn.log_softmax(out["logits"], -1)
  manual0 = logp[0, 0, 10] + logp[0, 1, 1]  # the pad at t=2 is not counted
  manual1 = logp[1, 0, 11] + logp[1, 1, 12] + logp[1, 2, 1]
  np.testing.assert_allclose(out["logp"], [manual0, manual1], rtol=1e-5)
  # Changing what sits in the padded slot must not change the score of row 0.
  batch2 = dict(batch, targets=batch["targets"].at[0, 2].set(0))
  np.testing.assert_allclose(scoring.score_targets(model, params, batch2)["logp"][0], manual0,
                             rtol=1e-5)


@pytest.mark.parametrize("encdec", [False, True])
def test_candidates_match_per_candidate_scoring(encdec):
  model = build_model(dict(preset="tiny", vocab_size=24, max_len=32,
                           num_encoder_layers=1 if encdec else 0))
  params = model.init(jax.random.PRNGKey(0))
  inputs = jnp.array([[5, 6, 0], [7, 8, 9]])
  cands = jnp.array([[[10, 1, 0], [11, 13, 1]], [[12, 1, 0], [14, 15, 1]]])
  out = scoring.score_candidates(model, params, inputs, cands, return_hidden=True)
  assert out["logp"].shape == (2, 2) and out["hidden"].shape[:3] == (2, 2, 3)
  for k in range(2):
    single = scoring.score_targets(model, params, dict(inputs=inputs, targets=cands[:, k]))
    np.testing.assert_allclose(out["logp"][:, k], single["logp"], rtol=1e-5)
