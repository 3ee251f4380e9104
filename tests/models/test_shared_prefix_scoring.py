"""Shared-prefix candidate scoring (one prompt prefill, K candidates over its cache) equals
scoring K full copies of prompt + candidate: logits, hidden states and parameter gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax import scoring
from slicjax.models.factory import build_model

PROMPTS = jnp.array([[5, 6, 7, 9, 4], [8, 9, 0, 0, 0], [10, 11, 0, 0, 0]], jnp.int32)
CANDS = jnp.array(
  [[[11, 12, 1, 0], [13, 1, 0, 0], [14, 15, 16, 1]],
   [[3, 1, 0, 0], [4, 5, 6, 7], [9, 9, 1, 0]],
   [[1, 0, 0, 0], [12, 13, 1, 0], [6, 7, 8, 1]]], jnp.int32)


@pytest.mark.parametrize(
  "cfg,separator",
  [
    (dict(preset="tiny", vocab_size=24, max_len=64), 2),
    (dict(preset="tiny", vocab_size=24, max_len=64), None),
    (dict(family="ssm", variant="s4d", preset="tiny", vocab_size=24), None),
    (dict(family="ssm", variant="selective", preset="tiny", vocab_size=24), 2),
  ],
  ids=["transformer_sep", "transformer_nosep", "s4d_nosep", "selective_sep"],
)
def test_shared_prefix_equals_copies(cfg, separator):
  base = dataclasses.replace(build_model(cfg), separator_id=separator)
  params = base.init(jax.random.PRNGKey(2))
  shared = dataclasses.replace(base, shared_prefix_scoring=True)
  copies = dataclasses.replace(base, shared_prefix_scoring=False)
  run = lambda m: jax.jit(lambda p: m.candidate_logits(p, PROMPTS, CANDS, return_hidden=True))
  a_logits, a_hidden = run(shared)(params)
  b_logits, b_hidden = run(copies)(params)
  real = np.asarray(CANDS != 0)  # positions after a candidate's EOS are padding, never scored
  np.testing.assert_allclose(np.asarray(a_logits)[real], np.asarray(b_logits)[real], atol=2e-5)
  np.testing.assert_allclose(np.asarray(a_hidden)[real], np.asarray(b_hidden)[real], atol=2e-5)

  def total_logp(model, p):
    return jnp.sum(scoring.score_candidates(model, p, PROMPTS, CANDS)["logp"])

  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(lambda p, m=m: total_logp(m, p)))(params)
                        for m in (shared, copies))
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4, err_msg=str(path))
