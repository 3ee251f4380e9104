"""``decode``: dispatch to each algorithm, caching, option errors, a real model adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_fakes import FakeModel, make_params

from slicjax.decoding import api, sampling
from slicjax.decoding import beam_search as bs

INPUTS = jnp.array([[5, 3, 2, 0], [2, 2, 1, 3], [7, 0, 0, 0]], jnp.int32)
PARAMS = make_params(seed=101, eos_bias=0.3)


def _direct(fn, **kw):
  step, init, cache = FakeModel().decode_state(PARAMS, INPUTS, kw["max_len"])
  return fn(step, init, cache, **kw)


@pytest.mark.parametrize(
  "method,options,fn",
  [
    ("beam", dict(beam_size=3, alpha=0.6), bs.beam_search),
    (
      "beam",
      dict(beam_size=3, alpha=0.5, length_penalty_style="power", finish_top_2k=True),
      bs.beam_search,
    ),
    (
      "diverse_beam",
      dict(beam_size=4, num_groups=2, diversity_strength=0.5),
      bs.diverse_beam_search,
    ),
    ("greedy", dict(min_len=2), sampling.greedy_search),
    ("sample", dict(num_samples=4, temperature=0.7, top_k=3), sampling.sample),
  ],
)
def test_decode_dispatches_to_the_algorithm(method, options, fn):
  rng = jax.random.PRNGKey(4)
  ids = jnp.array([7, 8, 9], jnp.int32)
  got = api.decode(
    FakeModel(), PARAMS, INPUTS, method=method, max_len=5, rng=rng, example_ids=ids, **options
  )
  extra = dict(rng=rng, example_ids_B=ids) if method == "sample" else {}
  want = _direct(fn, max_len=5, **options, **extra)
  k = options.get("beam_size", options.get("num_samples", 1))
  assert got.tokens_BxKxL.shape == (3, k, 5)
  np.testing.assert_array_equal(got.tokens_BxKxL, want.tokens_BxKxL)
  np.testing.assert_allclose(got.scores_BxK, want.scores_BxK, rtol=1e-6)
  np.testing.assert_array_equal(got.lengths_BxK, want.lengths_BxK)


def test_decode_compiles_once_and_params_are_arguments():
  model = FakeModel()
  api.decode(model, PARAMS, INPUTS, method="greedy", max_len=4)
  n = len(api._COMPILED)
  other = make_params(seed=102, eos_bias=-1.0)
  a = api.decode(model, other, INPUTS, method="greedy", max_len=4)
  assert len(api._COMPILED) == n  # same program, new parameters
  want = _direct(sampling.greedy_search, max_len=4)
  assert np.any(np.asarray(a.tokens_BxKxL) != np.asarray(want.tokens_BxKxL))
  step, init, cache = FakeModel().decode_state(other, INPUTS, 4)
  np.testing.assert_array_equal(
    a.tokens_BxKxL, sampling.greedy_search(step, init, cache, max_len=4).tokens_BxKxL
  )


def test_decode_errors_name_the_valid_choices():
  m = FakeModel()
  with pytest.raises(ValueError, match=r"unknown decoding method 'topk'.*'beam'.*'sample'"):
    api.decode(m, PARAMS, INPUTS, method="topk", max_len=4)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\].*beam_size"):
    api.decode(m, PARAMS, INPUTS, method="beam", max_len=4, beam_size=2, temperature=0.5)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['beams'\]"):
    api.decode(m, PARAMS, INPUTS, method="greedy", max_len=4, beams=2)
  with pytest.raises(ValueError, match="needs the option"):
    api.decode(m, PARAMS, INPUTS, method="diverse_beam", max_len=4, beam_size=4)
  with pytest.raises(ValueError, match="needs rng"):
    api.decode(m, PARAMS, INPUTS, method="sample", max_len=4)
  with pytest.raises(ValueError, match="max_len"):
    api.decode(m, PARAMS, INPUTS, method="greedy", max_len=0)
  with pytest.raises(ValueError, match="Python number"):
    api.decode(m, PARAMS, INPUTS, method="beam", max_len=4, beam_size=jnp.int32(2))
  with pytest.raises(ValueError, match="decode_state"):
    api.decode(object(), PARAMS, INPUTS, method="greedy", max_len=4)


def test_decode_with_a_real_transformer_adapter():
  from slicjax import scoring
  from slicjax.models import factory

  model = factory.build_model(
    dict(
      vocab_size=11,
      d_model=16,
      num_heads=2,
      num_kv_heads=2,
      head_dim=8,
      d_ff=32,
      num_layers=1,
      max_len=16,
    )
  )
  params = model.init(jax.random.PRNGKey(0), batch_size=1, input_len=4, target_len=4)
  inputs = jnp.array([[5, 6, 7, 0], [9, 4, 0, 0]], jnp.int32)
  res = api.decode(model, params, inputs, method="beam", max_len=5, beam_size=3, alpha=0.0)
  # Beam log-probs equal teacher-forced scoring of the returned candidates.
  scored = scoring.score_candidates(model, params, inputs, res.tokens_BxKxL)["logp"]
  np.testing.assert_allclose(res.logp_BxK, scored, rtol=1e-4, atol=1e-4)
  lens = np.asarray(res.lengths_BxK)
  np.testing.assert_array_equal(np.sum(np.asarray(res.tokens_BxKxL) != 0, axis=-1), lens)
