"""SSM encoder-decoder: cached decoding == teacher forcing, causality, encoder masking, candidates,
packing, decoding API, MLE training, logical axis names, config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slicjax import optim, scoring, sharding
from slicjax.decoding import api
from slicjax.models import seq_model, ssm_encdec
from slicjax.models.factory import build_model
from slicjax.pipelines import mle, tasks

ATOL = 1e-4
# Tiny graphs: XLA's CPU backend optimizations cost more compile time than they save.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST, **kw)


BASE = dict(
  family="ssm", num_encoder_layers=1, vocab_size=32, d_model=16, n_layers=2, d_state=8,
  num_heads=2, dt_min=0.02, dt_max=0.3, max_len=32,
)
# every SSM variant, with different encoder position / head / tying options
CONFIGS = {
  "s4d": dict(variant="s4d", init="lin", discretization="zoh"),
  "s5": dict(variant="s5", init="inv", discretization="bilinear", tie_embeddings=False,
             encoder_position="rope", num_kv_heads=1),
  "selective": dict(variant="selective", init="real", conv_width=3, encoder_position="learned",
                    encoder_mlp="gelu"),
}
NAMES = sorted(CONFIGS)
BATCH = dict(
  inputs=jnp.array([[5, 6, 7, 9, 0], [8, 9, 0, 0, 0], [11, 12, 13, 14, 15]]),
  targets=jnp.array([[10, 11, 1, 0], [12, 13, 14, 1], [20, 1, 0, 0]]),
)


@functools.lru_cache(maxsize=None)
def model(name, **kw):
  return build_model({**BASE, **CONFIGS[name], **kw})


@functools.lru_cache(maxsize=None)
def all_params():
  return jit(lambda r: {n: model(n).init(r) for n in NAMES})(jax.random.PRNGKey(0))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_factory_builds_an_encoder_decoder_with_the_transformer_interface():
  m = model("s4d")
  assert isinstance(m, seq_model.EncoderDecoder) and m.family == "ssm"
  assert isinstance(m.module, ssm_encdec.SSMEncoderDecoder)
  assert m.max_len == 32 and m.vocab_size == 32 and m.decoder_start_id == 2
  # a preset's attention sizes size the encoder, num_layers becomes the SSM depth
  tiny = build_model(dict(family="ssm", preset="tiny", num_encoder_layers=2, d_state=8))
  cfg = tiny.module.config
  assert (cfg.num_heads, cfg.enc_kv_heads, cfg.enc_head_dim, cfg.d_ff) == (4, 2, 16, 128)
  assert (cfg.n_layers, cfg.num_encoder_layers, cfg.d_model) == (2, 2, 64)
  # the decoder-only path is unchanged
  for kw in (dict(preset="tiny"), dict(num_encoder_layers=0), {}):
    assert isinstance(build_model(dict(family="ssm", **kw)), seq_model.PrefixLM)


def test_cached_decoding_equals_teacher_forcing():
  """The adapter's per-token step (and a module-level prefill) equals ``target_logits``."""
  params = all_params()
  inputs, targets = BATCH["inputs"], BATCH["targets"]

  def run(params):
    out = {}
    for n in NAMES:
      m = model(n)
      tf, hidden = m.target_logits(params[n], BATCH, return_hidden=True)
      step, tokens, cache = m.decode_state(params[n], inputs, max_len=targets.shape[1])

      def body(carry, t, step=step):
        tokens, cache = carry
        logits, cache = step(tokens, cache)
        return (targets[:, t], cache), logits

      _, stepped = jax.lax.scan(body, (tokens, cache), jnp.arange(targets.shape[1]))
      # module level: prefill the first 3 decoder tokens at once, then one step
      mod, p = m.module, {"params": params[n]}
      seg = (inputs != 0).astype(jnp.int32)
      enc = mod.apply(p, inputs, seg, method=mod.encode)
      dec_in = m._decoder_inputs(BATCH)
      out3, mut = mod.apply(
        {**p, "cache": cache["decoder"]}, enc, seg, dec_in[:, :3], decode=True,
        mutable=["cache"], method=mod.decode,
      )
      out1, _ = mod.apply(
        {**p, "cache": mut["cache"]}, enc, seg, dec_in[:, 3:], decode=True, mutable=["cache"],
        method=mod.decode,
      )
      out[n] = (tf, hidden, jnp.moveaxis(stepped, 0, 1), jnp.concatenate([out3, out1], 1), cache)
    return out

  outs = jit(run)(params)
  lengths = np.sum(np.asarray(targets) != 0, axis=1)
  for n, (tf, hidden, stepped, prefilled, cache) in outs.items():
    assert tf.dtype == jnp.float32 and tf.shape == (3, 4, 32) and hidden.shape == (3, 4, 16)
    for t in range(targets.shape[1]):
      rows = lengths > t  # past a row's EOS, teacher forcing sees padding, not the fed token
      assert max_diff(stepped[rows, t], tf[rows, t]) < ATOL, (n, t)
    assert max_diff(prefilled, tf) < ATOL, n
    # the cache: zero at the start, batch-leading, SSM states only (no per-length buffers)
    dec = jax.tree.leaves(cache["decoder"])
    assert dec and all(x.shape[0] == 3 and not np.any(x) for x in dec), n
    assert cache["encoded"].shape == (3, 5, 16) and cache["encoder_seg"].shape == (3, 5)
    m = model(n)
    shapes = [
      jax.eval_shape(lambda p, ml=ml: m.decode_state(p, inputs, ml)[2], params[n]) for ml in (2, 30)
    ]
    assert shapes[0] == shapes[1], n  # cache size does not depend on the decode length


def test_decoder_is_causal_and_reads_the_unpadded_encoder_input():
  length = 6
  dec = jnp.arange(10, 10 + length)[None, :]
  enc_in = jnp.array([[3, 4, 5, 6, 7, 0, 0]])
  # weights of the summed logits; zero on the replaced rows so a tied head cannot read them
  weights = jnp.arange(32.0).at[10 : 10 + length].set(0.0)

  def per_position(x, n, params):
    table = params["token_embed"]["embedding"].at[10 : 10 + length].set(x[0])
    p = {**params, "token_embed": {"embedding": table}}
    logits = model(n).module.apply({"params": p}, enc_in, dec)
    return jnp.sum(logits[0] * weights[None, :], -1)

  def run(params):
    jac = {}
    for n in NAMES:
      x = jnp.take(params[n]["token_embed"]["embedding"], dec, axis=0)
      jac[n] = jax.jacrev(functools.partial(per_position, n=n, params=params[n]))(x)
    # encoder: a real input token changes the logits; a padding token's id does not
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    inputs = jnp.array([[5, 6, 7, 0, 0], [5, 6, 8, 0, 0], [5, 6, 7, 13, 9]])
    targets = jnp.array([[10, 11, 12, 1]] * 3)
    batch = dict(inputs=inputs, targets=targets, inputs_segment_ids=seg)
    more_pad = dict(inputs=jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]]), targets=targets[:1])
    logits = {n: model(n).target_logits(params[n], batch)[0] for n in NAMES}
    longer = {n: model(n).target_logits(params[n], more_pad)[0] for n in NAMES}
    return jac, logits, longer

  jac, logits, longer = jit(run)(all_params())
  for n in NAMES:
    j = np.asarray(jac[n])  # [t, 1, s, D]: d output_t / d decoder embedding_s
    for t in range(length):
      past = np.abs(j[t, 0, : t + 1]).max()
      assert past > 0, (n, t)
      future = np.abs(j[t, 0, t + 1 :]).max(initial=0.0)
      assert future <= 1e-6 * past, (n, t)  # s4d trains by FFT: round-off only
    out = np.asarray(logits[n])
    assert max_diff(out[1], out[0]) > 1e-3, n  # the decoder reads the encoder (from t = 0)
    assert max_diff(out[1, 0], out[0, 0]) > 1e-4, n
    assert max_diff(out[2], out[0]) < 1e-6, n  # encoder padding is masked out
    assert max_diff(longer[n][0], out[0]) < ATOL, n  # so is extra right padding


def test_candidate_logits_equal_per_candidate_target_logits():
  inputs = BATCH["inputs"][:2]
  cands = jnp.array([[[10, 11, 1, 0], [12, 1, 0, 0], [13, 14, 15, 1]],
                     [[16, 17, 1, 0], [10, 1, 0, 0], [18, 19, 20, 21]]])

  def run(params):
    out = {}
    for n in NAMES:
      m = model(n)
      got = m.candidate_logits(params[n], inputs, cands, return_hidden=True)
      want = [m.target_logits(params[n], dict(inputs=inputs, targets=cands[:, k]),
                              return_hidden=True) for k in range(3)]
      out[n] = got, want
    return out

  for n, ((logits, hidden), want) in jit(run)(all_params()).items():
    assert logits.shape == (2, 3, 4, 32) and hidden.shape == (2, 3, 4, 16)
    for k, (wl, wh) in enumerate(want):
      assert max_diff(logits[:, k], wl) < ATOL, (n, k)
      assert max_diff(hidden[:, k], wh) < ATOL, (n, k)


def test_packed_batch_equals_separate_sequences():
  ex = [(jnp.array([5, 6, 7]), jnp.array([9, 10, 1])), (jnp.array([8, 9]), jnp.array([11, 12, 1]))]
  packed = dict(
    inputs=jnp.array([[5, 6, 7, 8, 9, 0]]), targets=jnp.array([[9, 10, 1, 11, 12, 1, 0]]),
    inputs_segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
    targets_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 0]]),
    inputs_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
    targets_positions=jnp.array([[0, 1, 2, 0, 1, 2, 0]]),
  )

  def run(params):
    out = {}
    for n in NAMES:
      m = model(n)
      single = [m.target_logits(params[n], dict(inputs=x[None], targets=y[None]))[0]
                for x, y in ex]
      out[n] = m.target_logits(params[n], packed)[0], single
    return out

  for n, (lp, (s1, s2)) in jit(run)(all_params()).items():
    assert max_diff(lp[0, :3], s1[0]) < ATOL, n
    assert max_diff(lp[0, 3:6], s2[0]) < ATOL, n
    assert max_diff(s1[0], s2[0]) > 1e-3, n  # the comparison can fail


def test_decoding_api_beam_and_greedy():
  inputs = BATCH["inputs"]
  for n in ("selective",):  # every variant's decoding step is checked above
    m, params = model(n), all_params()[n]
    beam = api.decode(m, params, inputs, method="beam", beam_size=3, max_len=6)
    greedy = api.decode(m, params, inputs, method="greedy", max_len=6)
    assert beam.tokens_BxKxL.shape == (3, 3, 6) and greedy.tokens_BxKxL.shape == (3, 1, 6)
    assert np.all(np.isfinite(np.asarray(beam.logp_BxK)))
    # the reported log-probabilities are the teacher-forced ones of the returned tokens, and
    # greedy == the argmax rollout under teacher forcing (until and including EOS)
    cands = jnp.concatenate([beam.tokens_BxKxL, greedy.tokens_BxKxL], 1)
    scored = jit(lambda p, t, m=m: scoring.score_candidates(m, p, inputs, t))(params, cands)
    logp = jnp.concatenate([beam.logp_BxK, greedy.logp_BxK], 1)
    assert max_diff(scored["logp"], logp) < 1e-3, n
    toks = np.asarray(greedy.tokens_BxKxL[:, 0])
    tf = np.asarray(scored["logits"][:, 3])  # [B, L, V] of the greedy candidate
    am = np.argmax(np.where(np.arange(32) == 0, -np.inf, tf), -1)  # pad_id is never generated
    lengths = np.asarray(greedy.lengths_BxK[:, 0])
    assert np.all(lengths >= 1)
    for b in range(3):
      np.testing.assert_array_equal(am[b, : lengths[b]], toks[b, : lengths[b]], err_msg=n)


def test_short_mle_training_lowers_the_loss(tmp_path):
  c = ml_collections.ConfigDict()
  c.model = {**BASE, **CONFIGS["s4d"], "vocab_size": 24, "d_model": 32, "n_layers": 1}
  c.data = {**tasks.DATA_KEYS, "name": "reverse", "input_len": 6, "target_len": 7,
            "synthetic_vocab": 24, "num_train": 64, "num_eval": 16}
  c.optimizer = {**optim.DEFAULTS, "learning_rate": 1e-2, "warmup_steps": 0,
                 "schedule": "constant"}
  c.train = {**mle.TRAIN_KEYS, "steps": 40, "batch_size": 8, "log_every": 10,
             "checkpoint_every": 1000, "progress": False}
  c.mesh_shape = (-1, 1, 1)
  logs = []
  state, model_, _ = mle.run(ml_collections.ConfigDict(c.to_dict()), str(tmp_path),
                             on_log=lambda step, m: logs.append(float(m["loss"])))
  assert isinstance(model_.module, ssm_encdec.SSMEncoderDecoder) and int(state.step) == 40
  assert len(logs) == 4 and all(np.isfinite(logs))
  assert logs[-1] < 0.8 * logs[0], logs


def test_every_param_has_logical_axis_names_and_shards():
  mesh = sharding.make_mesh((2, 2, 2))
  for n in NAMES:
    boxed = jax.eval_shape(model(n).init_fn(), jax.random.PRNGKey(0))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves), n
    sh = sharding.tree_shardings(mesh, boxed)
    layer = sh["decoder"]["layer_0"]
    assert tuple(layer["ssm_block"]["in_proj"]["kernel"].spec) == ("fsdp", "tensor")
    assert tuple(layer["cross_attention"]["query"]["kernel"].spec)[:2] == ("fsdp", "tensor")


def test_bad_configs_and_inputs_raise_clear_errors():
  def build(**kw):
    return build_model({**BASE, **kw})

  with pytest.raises(ValueError, match=r"unknown ssm encoder-decoder config key.*'num_head'"):
    build(num_head=2)
  with pytest.raises(ValueError, match=r"\['num_heads'\] only apply to the SSM encoder-decoder"):
    build_model(dict(family="ssm", num_heads=2))
  with pytest.raises(ValueError, match="num_encoder_layers=-1 must be an int >= 0"):
    build(num_encoder_layers=-1)
  with pytest.raises(ValueError, match="unknown encoder_position"):
    build(encoder_position="alibi")
  with pytest.raises(ValueError, match="unknown encoder_mlp"):
    build(encoder_mlp="tanh")
  with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
    build(num_heads=2, num_kv_heads=3, head_dim=8)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    build(num_heads=3)
  with pytest.raises(ValueError, match="encoder_position='learned' stores"):
    build(encoder_position="learned", max_len=1 << 30)
  with pytest.raises(ValueError, match="decoder_start_id=40"):
    build(decoder_start_id=40)
  with pytest.raises(ValueError, match="unknown SSM variant"):
    build(variant="lstm")
  with pytest.raises(ValueError, match="num_encoder_layers=0 must be >= 1"):
    ssm_encdec.SSMEncDecConfig(num_encoder_layers=0)
  m, params = model("s4d"), all_params()["s4d"]
  with pytest.raises(ValueError, match="max_len"):
    m.target_logits(params, dict(inputs=jnp.ones((1, 40), jnp.int32), targets=BATCH["targets"]))
  mod = m.module
  enc = jnp.zeros((2, 5, 16))
  with pytest.raises(ValueError, match="decoder tokens must be"):
    mod.apply({"params": params}, enc, jnp.ones((2, 5)), jnp.ones((4,), jnp.int32),
              method=mod.decode)
  with pytest.raises(ValueError, match="must be \\[B, S, D\\] and \\[B, S\\]"):
    mod.apply({"params": params}, enc, jnp.ones((2, 4)), jnp.ones((2, 3), jnp.int32),
              method=mod.decode)
