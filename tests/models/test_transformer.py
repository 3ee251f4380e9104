"""Transformer: cached decoding == teacher forcing, causality, packing, GQA, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import jitted_decode_state

from slicjax import scoring
from slicjax.models.factory import build_model
from slicjax.models.transformer import TransformerConfig, TransformerLM

BATCH = dict(
  inputs=jnp.array([[5, 6, 7, 9, 0], [8, 9, 0, 0, 0], [11, 12, 13, 14, 15]]),
  targets=jnp.array([[10, 11, 1, 0], [12, 13, 14, 1], [20, 1, 0, 0]]),
)

VARIANTS = {
  "llama_gqa_rope_untied": dict(num_kv_heads=2, position="rope", tie_embeddings=False),
  "learned_layernorm_gelu": dict(position="learned", norm="layer", mlp="gelu"),
  "t5_encdec_relative": dict(
    num_encoder_layers=2, position="relative", mlp="geglu", tied_logit_scale=True,
    scale_queries=False, decoder_start_id=0,
  ),
  "encdec_rope_relu": dict(num_encoder_layers=1, position="rope", mlp="relu"),
}


def _model(**kw):
  base = dict(preset="tiny", vocab_size=40, max_len=32)
  return build_model({**base, **kw})


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_teacher_forcing(name):
  model = _model(**VARIANTS[name])
  params = model.init(jax.random.PRNGKey(1))
  tf = scoring.score_targets(model, params, BATCH)["logits"]
  step, tokens, cache = jitted_decode_state(model, params, BATCH["inputs"], 8)
  lengths = np.sum(np.asarray(BATCH["targets"]) != 0, axis=1)
  for t in range(BATCH["targets"].shape[1]):
    logits, cache = step(tokens, cache)
    rows = lengths > t  # past a row's EOS, teacher forcing sees padding, not the fed token
    np.testing.assert_allclose(logits[rows], tf[rows, t], atol=2e-5, rtol=1e-5)
    tokens = BATCH["targets"][:, t]


def test_causality_gradients_after_t_are_zero():
  cfg = TransformerConfig(vocab_size=30, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                          d_ff=64, num_layers=2, max_len=16, tie_embeddings=False)
  model = TransformerLM(cfg)  # untied: the output head must not read the replaced rows
  tokens = jnp.array([[3, 4, 5, 6, 7, 8]])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]
  emb = params["token_embed"]["embedding"]
  x = jnp.take(emb, tokens, axis=0)

  def logit_at(x, t):
    # Replace the embedding lookup by feeding a table whose rows are the given vectors.
    table = emb.at[10:16].set(x[0])
    p = {**params, "token_embed": {"embedding": table}}
    out = model.apply({"params": p}, jnp.arange(10, 16)[None, :])
    return jnp.sum(out[0, t] * jnp.arange(30.0))

  grad = jax.jit(jax.grad(logit_at), static_argnums=1)
  for t in range(6):
    g = grad(x, t)
    assert np.all(np.asarray(g[0, t + 1:]) == 0.0), t
    assert np.any(np.asarray(g[0, : t + 1]) != 0.0), t


def test_bidirectional_config_sees_the_future():
  cfg = TransformerConfig(vocab_size=30, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                          d_ff=64, num_layers=1, max_len=16, causal=False)
  model = TransformerLM(cfg)
  a = jnp.array([[3, 4, 5, 6]])
  b = jnp.array([[3, 4, 5, 9]])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), a))["params"]
  la, lb = model.apply({"params": params}, a), model.apply({"params": params}, b)
  assert np.abs(np.asarray(la[0, 0] - lb[0, 0])).max() > 1e-4


def test_packed_batch_equals_separate_sequences():
  cfg = TransformerConfig(vocab_size=30, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                          d_ff=64, num_layers=2, max_len=16, position="rope")
  model = TransformerLM(cfg)
  s1, s2 = jnp.array([3, 4, 5]), jnp.array([7, 8, 9, 10])
  packed = jnp.concatenate([s1, s2, jnp.zeros(1, jnp.int32)])[None, :]
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), packed))["params"]
  lp = model.apply({"params": params}, packed, segment_ids_BxL=seg)
  l1 = model.apply({"params": params}, s1[None, :])
  l2 = model.apply({"params": params}, s2[None, :])
  np.testing.assert_allclose(lp[0, :3], l1[0], atol=1e-5)
  np.testing.assert_allclose(lp[0, 3:7], l2[0], atol=1e-5)


def test_packed_encoder_decoder_equals_separate():
  model = _model(num_encoder_layers=1, position="relative")
  params = model.init(jax.random.PRNGKey(0))
  ex = [(jnp.array([5, 6, 7]), jnp.array([9, 10, 1])), (jnp.array([8, 9]), jnp.array([11, 1]))]
  packed = dict(
    inputs=jnp.array([[5, 6, 7, 8, 9, 0]]), targets=jnp.array([[9, 10, 1, 11, 1, 0]]),
    inputs_segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
    targets_segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
    inputs_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
    targets_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
  )
  lp = scoring.score_targets(model, params, packed)["logits"]
  for (x, y), sl in zip(ex, [slice(0, 3), slice(3, 5)]):
    single = scoring.score_targets(model, params, dict(inputs=x[None], targets=y[None]))["logits"]
    np.testing.assert_allclose(lp[0, sl], single[0], atol=1e-5)


def test_bf16_compute_with_f32_params_and_remat():
  model = _model(dtype="bfloat16", remat=True)
  params = model.init(jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = scoring.score_targets(model, params, BATCH)
  assert out["logits"].dtype == jnp.float32
  f32 = _model()
  ref = scoring.score_targets(f32, params, BATCH)["logp"]
  np.testing.assert_allclose(out["logp"], ref, rtol=0.05)
  g = jax.grad(lambda p: scoring.score_targets(model, p, BATCH)["logp"].sum())(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_every_param_has_logical_axis_names():
  import flax.linen as nn

  for kw in ({}, {"num_encoder_layers": 1, "position": "relative", "tie_embeddings": False}):
    model = _model(**kw)
    boxed = jax.eval_shape(model.init_fn(), jax.random.PRNGKey(0))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)


def test_sequence_longer_than_max_len_raises():
  model = _model()
  params = model.init(jax.random.PRNGKey(0))
  long = dict(inputs=jnp.ones((1, 30), jnp.int32), targets=jnp.ones((1, 10), jnp.int32))
  with pytest.raises(ValueError, match="max_len"):
    scoring.score_targets(model, params, long)
  with pytest.raises(ValueError, match="max_len"):
    model.decode_state(params, jnp.ones((1, 20), jnp.int32), max_len=20)


def test_unknown_config_key_raises():
  with pytest.raises(ValueError, match="unknown transformer config key.*d_modle"):
    build_model(dict(d_modle=3))
  with pytest.raises(ValueError, match="unknown model family"):
    build_model(dict(family="rnn"))
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    build_model(dict(num_heads=4, num_kv_heads=3))
