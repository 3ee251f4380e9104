"""PrefixLM without a separator (pretrained models): layout, scoring and decoding.

Ground truth is the bare module run on the concatenated ``prompt + target`` of each row.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import jitted_decode_state

from slicjax import scoring
from slicjax.decoding.api import decode
from slicjax.models.factory import build_model

PROMPTS = [[5, 6, 7], [8, 9, 0], [10, 0, 0]]  # ragged: 3, 2 and 1 prompt tokens
TARGETS = [[11, 12, 1, 0], [13, 1, 0, 0], [14, 15, 16, 1]]


@pytest.fixture(scope="module")
def model_and_params():
  base = build_model(dict(preset="tiny", vocab_size=24, max_len=32))
  model = dataclasses.replace(base, separator_id=None)
  return model, base.init(jax.random.PRNGKey(3))


def _row_logits(model, params, tokens):
  return model.module.apply({"params": params}, jnp.array([tokens], jnp.int32))[0]


def test_target_logits_equal_the_module_on_prompt_plus_target(model_and_params):
  model, params = model_and_params
  batch = dict(inputs=jnp.array(PROMPTS), targets=jnp.array(TARGETS))
  logits, _ = model.target_logits(params, batch)
  for b, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
    p = [x for x in p if x]
    t = [x for x in t if x]
    ref = _row_logits(model, params, p + t)
    # target token j is predicted at position len(p) - 1 + j
    want = ref[len(p) - 1 : len(p) - 1 + len(t)]
    np.testing.assert_allclose(logits[b, : len(t)], want, atol=1e-5)
  scores = scoring.score_targets(model, params, batch)
  assert np.all(np.isfinite(np.asarray(scores["logp"])))


def test_separator_changes_the_layout(model_and_params):
  model, params = model_and_params
  with_sep = dataclasses.replace(model, separator_id=2)
  batch = dict(inputs=jnp.array(PROMPTS), targets=jnp.array(TARGETS))
  a, _ = model.target_logits(params, batch)
  b, _ = with_sep.target_logits(params, batch)
  ref = _row_logits(model, params, [5, 6, 7, 2, 11, 12, 1])
  np.testing.assert_allclose(b[0, :3], ref[3:6], atol=1e-5)
  assert not np.allclose(a[0, :3], b[0, :3], atol=1e-3)


def test_greedy_decoding_equals_teacher_forced_argmax(model_and_params):
  model, params = model_and_params
  n = 6
  out = decode(model, params, jnp.array(PROMPTS), method="greedy", max_len=n)
  tokens = np.asarray(out.tokens_BxKxL)[:, 0]
  for b, p in enumerate(PROMPTS):
    seq = [x for x in p if x]
    want = []
    for _ in range(n):
      nxt = int(jnp.argmax(_row_logits(model, params, seq)[-1]))
      want.append(nxt)
      seq.append(nxt)
      if nxt == 1:
        break
    np.testing.assert_array_equal(tokens[b, : len(want)], want)


def test_decoding_length_check_counts_no_separator(model_and_params):
  model, params = model_and_params
  # 3 prompt tokens + 29 new tokens fit max_len=32 without a separator, 30 do not.
  decode(model, params, jnp.array(PROMPTS), method="greedy", max_len=29)
  with pytest.raises(ValueError, match="max_len"):
    decode(model, params, jnp.array(PROMPTS), method="greedy", max_len=30)


@pytest.mark.parametrize("separator", [None, 2])
def test_parallel_prefill_equals_sequential_prefill(model_and_params, separator):
  model, params = model_and_params
  par = dataclasses.replace(model, separator_id=separator, parallel_prefill=True)
  seq = dataclasses.replace(model, separator_id=separator, parallel_prefill=False)
  inputs = jnp.array(PROMPTS)
  step_p, first_p, cache_p = jitted_decode_state(par, params, inputs, 8)
  step_s, first_s, cache_s = jitted_decode_state(seq, params, inputs, 8)
  np.testing.assert_array_equal(first_p, first_s)
  # positions equal; the KV slots each row has filled are equal (later slots are masked)
  n_B = np.array([3, 2, 1]) - (0 if separator else 1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cache_p), jax.tree.leaves(cache_s)):
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 1:
      np.testing.assert_array_equal(a, b, err_msg=str(path))
    else:
      for row, n in enumerate(n_B):
        # KV leaves are [B, G, slots, K]
        np.testing.assert_allclose(a[row, :, :n], b[row, :, :n], atol=1e-5, err_msg=str(path))
  # the next steps' logits agree
  tok_p, tok_s = first_p, first_s
  for _ in range(4):
    lp, cache_p = step_p(tok_p, cache_p)
    ls, cache_s = step_s(tok_s, cache_s)
    np.testing.assert_allclose(lp, ls, atol=1e-5)
    tok_p = tok_s = jnp.argmax(lp, -1).astype(jnp.int32)
