"""Parallel (one-scan) prompt prefill of SSM prefix LMs equals the step-by-step prefill: same
recurrent and convolution states for ragged prompts, same logits afterwards, same decodes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import jitted_decode_state

from slicjax.decoding.api import decode
from slicjax.models.factory import build_model

PROMPTS = jnp.array([[5, 6, 7, 9, 4], [8, 9, 0, 0, 0], [10, 0, 0, 0, 0], [3, 4, 5, 6, 0]])


@pytest.mark.parametrize("variant", ["s4d", "s5", "selective"])
@pytest.mark.parametrize("separator", [None, 2])
def test_parallel_prefill_equals_sequential(variant, separator):
  base = build_model(dict(family="ssm", variant=variant, preset="tiny", vocab_size=24))
  params = base.init(jax.random.PRNGKey(7))
  par = dataclasses.replace(base, separator_id=separator, parallel_prefill=True)
  seq = dataclasses.replace(base, separator_id=separator, parallel_prefill=False)
  step_p, first_p, cache_p = jitted_decode_state(par, params, PROMPTS, 6)
  step_s, first_s, cache_s = jitted_decode_state(seq, params, PROMPTS, 6)
  np.testing.assert_array_equal(first_p, first_s)
  leaves_p = jax.tree_util.tree_leaves_with_path(cache_p)
  assert leaves_p, "empty cache"
  for (path, a), b in zip(leaves_p, jax.tree.leaves(cache_s)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=str(path))
  tok_p, tok_s = first_p, first_s
  for _ in range(4):
    lp, cache_p = step_p(tok_p, cache_p)
    ls, cache_s = step_s(tok_s, cache_s)
    np.testing.assert_allclose(lp, ls, atol=2e-5)
    tok_p = tok_s = jnp.argmax(lp, -1).astype(jnp.int32)
  # whole decodes agree too
  a = decode(par, params, PROMPTS, method="beam", beam_size=3, max_len=6)
  b = decode(seq, params, PROMPTS, method="beam", beam_size=3, max_len=6)
  np.testing.assert_array_equal(a.tokens_BxKxL, b.tokens_BxKxL)
