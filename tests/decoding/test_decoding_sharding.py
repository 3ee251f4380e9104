"""Every algorithm gives the same result with the batch sharded over an 8-device mesh."""

import jax
import numpy as np
from decoding_fakes import make_inputs, make_params, make_step
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from slicjax.decoding import beam_search as bs
from slicjax.decoding import sampling


def _all_methods(params, init_B, cache, rng):
  step = make_step(params)
  return {
    "greedy": sampling.greedy_search(step, init_B, cache, max_len=6, no_repeat_ngram_size=2),
    "sample": sampling.sample(
      step, init_B, cache, rng=rng, max_len=6, num_samples=3, temperature=0.8, top_k=3, top_p=0.9
    ),
    "beam": bs.beam_search(step, init_B, cache, beam_size=4, max_len=6, min_len=2),
    "diverse": bs.diverse_beam_search(
      step, init_B, cache, beam_size=4, num_groups=2, diversity_strength=0.7, max_len=6
    ),
  }


def test_sharded_batch_equals_unsharded():
  assert len(jax.devices()) == 8, "tests/conftest.py simulates 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  data = NamedSharding(mesh, P("data"))
  params = make_params(seed=91, eos_bias=0.3)
  init, cache = make_inputs(16, seed=92)
  rng = jax.random.PRNGKey(3)
  fn = jax.jit(_all_methods)
  want = fn(params, init, cache, rng)
  init_s, cache_s = jax.device_put(init, data), jax.device_put(cache, data)
  assert init_s.sharding.spec == P("data") and len(cache_s["state"].sharding.device_set) == 8
  got = fn(params, init_s, cache_s, rng)
  for name in want:
    w, g = want[name], got[name]
    np.testing.assert_array_equal(g.tokens_BxKxL, w.tokens_BxKxL, err_msg=name)
    np.testing.assert_array_equal(g.lengths_BxK, w.lengths_BxK, err_msg=name)
    np.testing.assert_allclose(g.logp_BxK, w.logp_BxK, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(g.scores_BxK, w.scores_BxK, rtol=1e-6, err_msg=name)
  # The outputs are non-trivial: several lengths and distinct candidates.
  assert len(set(np.asarray(want["beam"].lengths_BxK).ravel())) > 1
  assert len({tuple(x) for x in np.asarray(want["sample"].tokens_BxKxL[0])}) > 1
