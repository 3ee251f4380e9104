"""Bucketed decode attention (``cache_bucket``): same tokens and scores as attending over the
whole cache buffer, for greedy, beam search and a T5-style relative-position encoder-decoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.decoding.api import decode
from slicjax.models import layers
from slicjax.models.factory import build_model

PROMPTS = jnp.array([[5, 6, 7, 9, 4, 3], [8, 9, 0, 0, 0, 0], [10, 11, 12, 0, 0, 0]], jnp.int32)


def test_bucket_sizes():
  assert layers.cache_buckets(256, 64) == (64, 128, 256)
  assert layers.cache_buckets(300, 64) == (64, 128, 256, 300)
  assert layers.cache_buckets(64, 64) == (64,)
  assert layers.cache_buckets(256, 0) == (256,)


def _pair(**kw):
  """The same model with buckets of 4 slots and with bucketing off (both share params)."""
  on = build_model(dict(preset="tiny", vocab_size=24, max_len=40, cache_bucket=4, **kw))
  off = build_model(dict(preset="tiny", vocab_size=24, max_len=40, cache_bucket=0, **kw))
  return on, off, on.init(jax.random.PRNGKey(5))


@pytest.mark.parametrize("kw", [{}, dict(num_encoder_layers=2, position="relative")],
                         ids=["prefix_lm", "t5_encoder_decoder"])
def test_bucketed_decoding_equals_full_buffer(kw):
  on, off, params = _pair(**kw)
  # 30 new tokens cross the 4-, 8-, 16- and 32-slot buckets.
  for method, opts in (("greedy", {}), ("beam", dict(beam_size=3, alpha=0.6))):
    a = decode(on, params, PROMPTS, method=method, max_len=30, eos_id=-1, **opts)
    b = decode(off, params, PROMPTS, method=method, max_len=30, eos_id=-1, **opts)
    np.testing.assert_array_equal(a.tokens_BxKxL, b.tokens_BxKxL, err_msg=method)
    np.testing.assert_allclose(a.logp_BxK, b.logp_BxK, rtol=1e-5, atol=1e-5, err_msg=method)


def test_bucketed_step_logits_equal_teacher_forcing():
  on, _, params = _pair()
  model = dataclasses.replace(on, separator_id=None)
  seq = [5, 6, 7, 9, 4, 3, 8, 2, 11, 13, 17, 19, 21, 6, 7]
  step, tok, cache = model.decode_state(params, jnp.array([seq[:3]], jnp.int32), 20)
  full = model.module.apply({"params": params}, jnp.array([seq], jnp.int32))[0]
  # the step really branches on the filled length (one lax.cond per layer), and does not with
  # bucketing off
  assert "cond[" in str(jax.make_jaxpr(step)(tok, cache))
  off_step, off_tok, off_cache = dataclasses.replace(_pair()[1], separator_id=None).decode_state(
    params, jnp.array([seq[:3]], jnp.int32), 20
  )
  assert "cond[" not in str(jax.make_jaxpr(off_step)(off_tok, off_cache))
  step = jax.jit(step)
  for t in range(2, len(seq) - 1):  # the last prompt token is fed first, then the sequence
    logits, cache = step(tok, cache)
    np.testing.assert_allclose(logits[0], full[t], atol=2e-5, err_msg=f"position {t}")
    tok = jnp.array([seq[t + 1]], jnp.int32)



@pytest.mark.parametrize("kw", [{}, dict(num_encoder_layers=2, position="relative")],
                         ids=["prefix_lm", "t5_encoder_decoder"])
def test_decode_cache_spans_the_request_not_the_context(kw):
  """A model with a 4,096-position context decoding 6 + 1 + 12 tokens gets a cache of the slots
  the request needs (19 for the prefix LM; max(12, 6) for the encoder-decoder), and its greedy
  tokens and log-probabilities equal teacher forcing through the full-context module."""
  big = build_model(dict(preset="tiny", vocab_size=24, max_len=4096, **kw))
  params = big.init(jax.random.PRNGKey(3))
  _, _, cache = big.decode_state(params, PROMPTS, 12)
  slots = {x.shape[2] for x in jax.tree.leaves(cache) if x.ndim == 4}  # [B, G, slots, K] leaves
  assert slots == ({12} if kw else {19}), slots
  out = decode(big, params, PROMPTS, method="greedy", max_len=12, eos_id=-1)
  toks = out.tokens_BxKxL[:, 0]
  logits, _ = big.target_logits(params, {"inputs": PROMPTS, "targets": toks})
  np.testing.assert_array_equal(jnp.argmax(logits, -1), toks)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, :, None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(out.logp_BxK[:, 0], logp, rtol=1e-5, atol=1e-4)
