"""``scan_layers``: the nn.scan layer stack computes what the unrolled stack computes from the
same (stacked) weights, in training, teacher-forced scoring and cached / bucketed decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax import scoring
from slicjax.decoding.api import decode
from slicjax.models.factory import build_model
from slicjax.models.transformer import (
  TransformerConfig,
  TransformerLM,
  stack_layer_params,
  unstack_layer_params,
)

BATCH = dict(
  inputs=jnp.array([[5, 6, 7, 9, 0], [8, 9, 0, 0, 0], [11, 12, 13, 14, 15]]),
  targets=jnp.array([[10, 11, 1, 0], [12, 13, 14, 1], [20, 1, 0, 0]]),
)
PROMPTS = jnp.array([[5, 6, 7, 9, 4, 3], [8, 9, 0, 0, 0, 0], [10, 11, 12, 0, 0, 0]], jnp.int32)

VARIANTS = {
  "llama_gqa_untied_remat": dict(num_kv_heads=2, tie_embeddings=False, remat=True),
  "t5_encdec_relative": dict(
    num_encoder_layers=2, position="relative", mlp="geglu", scale_queries=False,
    decoder_start_id=0,
  ),
}


def _pair(**kw):
  """Unrolled and scanned models (2 layers; buckets of 8 slots so decoding crosses buckets) and
  the unrolled params with their stacked copy."""
  base = dict(preset="tiny", vocab_size=40, max_len=24, cache_bucket=8, **kw)
  unrolled = build_model(base)
  scanned = build_model({**base, "scan_layers": True})
  params = unrolled.init(jax.random.PRNGKey(1))
  return unrolled, scanned, params, stack_layer_params(params)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_scanned_equals_unrolled_scoring_and_decoding(name):
  unrolled, scanned, params, stacked = _pair(**VARIANTS[name])
  # the stacked tree has exactly the scanned model's own init shapes
  own = jax.eval_shape(scanned.init, jax.random.PRNGKey(2))
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
  a = scoring.score_targets(unrolled, params, BATCH)["logits"]
  b = scoring.score_targets(scanned, stacked, BATCH)["logits"]
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  if "encdec" in name:
    return  # decoding below is the decoder-only model's (the encoder-decoder's was checked
    # by hand: same greedy tokens; it adds ~15 s of compiles on CPU)
  # 12 greedy tokens after a parallel prefill: steps cross the 8- and 16-slot buckets
  ga = decode(unrolled, params, PROMPTS, method="greedy", max_len=12, eos_id=-1)
  gb = decode(scanned, stacked, PROMPTS, method="greedy", max_len=12, eos_id=-1)
  np.testing.assert_array_equal(ga.tokens_BxKxL, gb.tokens_BxKxL)
  np.testing.assert_allclose(ga.logp_BxK, gb.logp_BxK, atol=1e-4, rtol=1e-5)
  # the cache stays batch-leading (beam search and shared-prefix scoring repeat and reorder it
  # on axis 0); one position for all layers, no per-layer cache_index; heads before slots, and
  # the slots are the request's (prompt 6 + separator + 8 new), not the model's max_len
  assert PROMPTS.shape[1] + 1 + 8 == 15 < scanned.max_len
  _, _, cache = scanned.decode_state(stacked, PROMPTS, max_len=8)
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]}
  assert shapes == {
    "['decoder']['layers']['self_attention']['cached_key']": (3, 2, 2, 15, 16),
    "['decoder']['layers']['self_attention']['cached_value']": (3, 2, 2, 15, 16),
    "['decoder']['position']": (3,),
  }


def test_scanned_train_step_gradients_equal_unrolled():
  cfg = TransformerConfig(vocab_size=30, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                          d_ff=64, num_layers=2, max_len=16, remat=True)
  tokens = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 3, 4, 0, 0, 0]])
  seg = (tokens != 0).astype(jnp.int32)
  params = nn.unbox(TransformerLM(cfg).init(jax.random.PRNGKey(0), tokens))["params"]

  def loss(p, c):
    logits = TransformerLM(c).apply({"params": p}, tokens[:, :-1], segment_ids_BxL=seg[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * seg[:, 1:]) / jnp.sum(seg[:, 1:])

  scfg = TransformerConfig(**{**cfg.__dict__, "scan_layers": True})
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  la, ga = grad(params, cfg)
  lb, gb = grad(stack_layer_params(params), scfg)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(stack_layer_params(ga)), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_stack_unstack_round_trip_and_errors():
  _, _, params, stacked = _pair(num_encoder_layers=2, position="relative")
  assert set(stacked["encoder"]) == {"layers", "final_norm", "relative_bias"}
  scanned = build_model(dict(preset="tiny", vocab_size=40, max_len=24, scan_layers=True))
  abstract = jax.eval_shape(scanned.init_fn(input_len=4, target_len=4), jax.random.PRNGKey(0))
  # the layer axis has a logical name (replicated by the default sharding rules)
  names = abstract["params"]["decoder"]["layers"]["mlp"]["up"]["kernel"].names
  assert names == ("layers", "embed", "mlp")
  assert stacked["decoder"]["layers"]["mlp"]["up"]["kernel"].shape == (2, 64, 128)
  back = unstack_layer_params(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, params)))
  with pytest.raises(ValueError, match="not layer_0"):
    stack_layer_params({"layer_0": {"w": jnp.ones(2)}, "layer_2": {"w": jnp.ones(2)}})
  with pytest.raises(ValueError, match="differs"):
    stack_layer_params({"layer_0": {"w": jnp.ones(2)}, "layer_1": {"w": jnp.ones(3)}})
  with pytest.raises(ValueError, match="num_layers >= 1"):
    TransformerConfig.from_dict(dict(num_layers=0, scan_layers=True))
