"""SSM decoders: conv == scan == recurrence == numpy reference, decoding, causality, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax import scoring, sharding
from slicjax.models import ssm_layers
from slicjax.models.factory import build_model
from slicjax.models.ssm import SSMLM, SSMConfig, init_cache

RTOL = 1e-4
# Tiny graphs: XLA's CPU backend optimizations cost more compile time than they save.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST, **kw)


LAYERS = {"s4d": ssm_layers.S4D, "s5": ssm_layers.S5, "selective": ssm_layers.Selective}


def rel_err(a, b):
  a, b = np.asarray(a).astype(np.complex128), np.asarray(b).astype(np.complex128)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------------
# numpy references (float64 / complex128), written from the formulas in REFERENCE.md section 5
# ---------------------------------------------------------------------------------------------
def np_discretize(a, b, dt, method):
  if method == "zoh":
    abar = np.exp(dt * a)
    return abar, (abar - 1) / a * b
  return (1 + dt * a / 2) / (1 - dt * a / 2), dt / (1 - dt * a / 2) * b


def np_complex(p, name):
  re = np.asarray(p[name + "_re"], np.float64)
  return re + 1j * np.asarray(p[name + "_im"], np.float64) if name + "_im" in p else re


def np_a(p):
  a = -np.exp(np.asarray(p["A_log"], np.float64))
  return a + 1j * np.asarray(p["A_im"], np.float64) if "A_im" in p else a


def np_softplus(x):
  return np.log1p(np.exp(x))


def reference(variant, p, u, method, scale):
  """Sequential recurrence x_t = Abar x_{t-1} + Bbar u_t, y_t = scale Re(C x_t) + D u_t."""
  u = np.asarray(u, np.float64)
  b_, length, h = u.shape
  a, d = np_a(p), np.asarray(p["D"], np.float64)
  y = np.zeros_like(u)
  if variant == "s4d":
    # convolution with the naive kernel K_l = scale Re(sum_n C_n Bbar_n Abar_n^l)
    dt = np.exp(np.asarray(p["log_dt"], np.float64))[:, None]
    abar, bbar = np_discretize(a, np_complex(p, "B"), dt, method)
    c = np_complex(p, "C")
    k = np.stack([scale * np.real(np.sum(c * bbar * abar**i, axis=1)) for i in range(length)], 1)
    for t in range(length):
      for s in range(t + 1):
        y[:, t] += k[None, :, t - s] * u[:, s]
    return y + d * u
  if variant == "s5":
    dt = np.exp(np.asarray(p["log_dt"], np.float64))[:, None]
    abar, bbar = np_discretize(a[:, None], np_complex(p, "B"), dt, method)
    c = np_complex(p, "C")
    x = np.zeros((b_, a.shape[0]), complex)
    for t in range(length):
      x = abar[None, :, 0] * x + u[:, t] @ bbar.T
      y[:, t] = scale * np.real(x @ c.T)
    return y + d * u

  # selective: projections recomputed in numpy
  def dense(name, x):
    out = x @ np.asarray(p[name]["kernel"], np.float64)
    return out + np.asarray(p[name]["bias"], np.float64) if "bias" in p[name] else out

  dt = np_softplus(dense("dt_proj", dense("dt_in", u)))
  braw, craw = dense("B_proj", u), dense("C_proj", u)
  m = a.shape[1]
  if np.iscomplexobj(a):
    braw, craw = braw[..., :m] + 1j * braw[..., m:], craw[..., :m] + 1j * craw[..., m:]
  x = np.zeros((b_, h, m), complex)
  for t in range(length):
    abar, bbar = np_discretize(a[None], braw[:, t, None, :], dt[:, t, :, None], method)
    x = abar * x + bbar * u[:, t, :, None]
    y[:, t] = scale * np.real(np.einsum("bhm,bm->bh", x, craw[:, t]))
  return y + d * u


def make_layer(variant, init, method, mode):
  kw = dict(d_state=8, a_init=init, discretization=method, mode=mode, dt_min=0.05, dt_max=0.5)
  return LAYERS[variant](dt_rank=3, **kw) if variant == "selective" else LAYERS[variant](**kw)


# every variant with both discretizations and all three inits
CASES = [
  ("s4d", "lin", "zoh"),
  ("s4d", "inv", "bilinear"),
  ("s4d", "real", "bilinear"),
  ("s5", "lin", "bilinear"),
  ("s5", "inv", "zoh"),
  ("s5", "real", "zoh"),
  ("selective", "lin", "bilinear"),
  ("selective", "inv", "zoh"),
  ("selective", "real", "zoh"),
]
U = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 6))
# segment test: row 0 packs segments [0, 4) and [4, 9); row 1 is segment 2 alone; row 2 unpacked
_U0 = jax.random.normal(jax.random.PRNGKey(1), (1, 10, 6))
U3 = jnp.concatenate([_U0, jnp.concatenate([_U0[:, 4:9], jnp.zeros((1, 5, 6))], 1), _U0], 0)
PACKED_SEG = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [1] * 5 + [0] * 5, [1] * 10])
PLAIN_SEG = jnp.array([[1] * 7 + [0] * 3, [1] * 5 + [0] * 5, [1] * 10])  # no boundary: FFT path


@functools.lru_cache(maxsize=None)
def variant_results(variant):
  """One compiled call per variant: for each case, parameters and every mode's output."""

  def f(u, u3, packed_seg, plain_seg):
    out = {}
    for v, init, method in CASES + [(variant, "lin", "zoh")]:
      if v != variant:
        continue
      layers = {m: make_layer(variant, init, method, m) for m in ssm_layers.MODES[variant]}
      params = nn.unbox(layers["scan"].init(jax.random.PRNGKey(3), u))["params"]
      out[f"{init}-{method}"] = (
        params,
        {m: layer.apply({"params": params}, u) for m, layer in layers.items()},
      )
    out["segments"] = {
      m: (
        layer.apply({"params": params}, u3, packed_seg),
        layer.apply({"params": params}, u3, plain_seg),
      )
      for m, layer in layers.items()
    }
    return out

  return jit(f)(U, U3, PACKED_SEG, PLAIN_SEG)


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_vandermonde_kernel_equals_naive_sum():
  rng = np.random.default_rng(0)
  h, m, length = 3, 5, 11
  abar = rng.uniform(0.3, 0.95, (h, m)) * np.exp(1j * rng.uniform(-3, 3, (h, m)))
  w = rng.normal(size=(h, m)) + 1j * rng.normal(size=(h, m))
  naive = np.zeros((h, length))
  for hh in range(h):
    for ll in range(length):
      naive[hh, ll] = 2 * sum((w[hh, n] * abar[hh, n] ** ll).real for n in range(m))
  got = ssm_layers.vandermonde_kernel(
    jnp.asarray(abar, jnp.complex64), jnp.asarray(w, jnp.complex64), length, 2.0
  )
  assert rel_err(got, naive) < RTOL
  # real modes (including a negative bilinear pole) with scale 1
  abar_r, w_r = rng.uniform(-0.9, 0.95, (h, m)), rng.normal(size=(h, m))
  naive_r = np.stack([np.sum(w_r * abar_r**ll, axis=1) for ll in range(length)], 1)
  got_r = ssm_layers.vandermonde_kernel(
    jnp.asarray(abar_r, jnp.float32), jnp.asarray(w_r, jnp.float32), length, 1.0
  )
  assert rel_err(got_r, naive_r) < RTOL


def test_fft_convolutions_equal_direct_convolution():
  rng = np.random.default_rng(1)
  b, length, h = 2, 13, 3
  u, k = rng.normal(size=(b, length, h)), rng.normal(size=(h, length))
  direct = np.stack(
    [np.stack([np.convolve(u[i, :, c], k[c])[:length] for c in range(h)], -1) for i in range(b)]
  )
  got = ssm_layers.causal_fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
  assert rel_err(got, direct) < RTOL
  k3 = rng.normal(size=(length, 4, h))  # MIMO: [L, H_out, H_in]
  direct3 = np.zeros((b, length, 4))
  for t in range(length):
    for s in range(t + 1):
      direct3[:, t] += u[:, s] @ k3[t - s].T
  got3 = ssm_layers.causal_fft_conv_mimo(jnp.asarray(u, jnp.float32), jnp.asarray(k3, jnp.float32))
  assert rel_err(got3, direct3) < RTOL


def test_linear_scan_equals_recurrence_and_loop_with_initial_state():
  rng = np.random.default_rng(2)
  shape = (2, 9, 3)
  a = rng.uniform(0.2, 0.99, shape) * np.exp(1j * rng.uniform(-2, 2, shape))
  b = rng.normal(size=shape) + 1j * rng.normal(size=shape)
  x0 = rng.normal(size=(2, 3)) + 1j * rng.normal(size=(2, 3))
  x, loop = x0, []
  for t in range(shape[1]):
    x = a[:, t] * x + b[:, t]
    loop.append(x)
  loop = np.stack(loop, 1)
  args = [jnp.asarray(v, jnp.complex64) for v in (a, b, x0)]
  assert rel_err(ssm_layers.linear_scan(*args), loop) < RTOL
  assert rel_err(ssm_layers.linear_recurrence(*args), loop) < RTOL


def test_segment_starts_and_segment_aware_depthwise_conv():
  seg = jnp.array([[1, 1, 2, 2, 2, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  want = [[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
  np.testing.assert_array_equal(ssm_layers.segment_starts(seg), np.array(want, bool))
  x = jnp.arange(1.0, 7.0)[None, :, None]
  kernel = jnp.array([[100.0], [10.0], [1.0]])  # y_t = 100 x_{t-2} + 10 x_{t-1} + x_t
  y, prefix = ssm_layers.causal_depthwise_conv(x, kernel, jnp.zeros(1), None, seg[:1])
  np.testing.assert_allclose(y[0, :, 0], [1, 12, 3, 34, 345, 6])  # taps stop at segments
  np.testing.assert_allclose(prefix[0, :, 0], [5, 6])


def test_diagonal_a_inits():
  re, im = ssm_layers.diagonal_a("inv", 4)
  np.testing.assert_allclose(re, [-0.5, -0.5])
  np.testing.assert_allclose(im, [12 / np.pi, 4 / (3 * np.pi)])
  re, im = ssm_layers.diagonal_a("lin", 6)
  np.testing.assert_allclose(im, [0, np.pi, 2 * np.pi])
  re, im = ssm_layers.diagonal_a("real", 3)
  np.testing.assert_allclose(re, [-1, -2, -3])
  np.testing.assert_allclose(im, 0)


# ---------------------------------------------------------------------------------------------
# layers: every mode equals the sequential numpy reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,init,method", CASES)
def test_layer_modes_equal_numpy_reference(variant, init, method):
  params, outs = variant_results(variant)[f"{init}-{method}"]
  # log_dt inside the configured range
  if variant != "selective":
    assert np.all(np.exp(params["log_dt"]) >= 0.05 - 1e-6)
    assert np.all(np.exp(params["log_dt"]) <= 0.5 + 1e-6)
  scale = 1.0 if init == "real" else 2.0
  ref = reference(variant, params, U, method, scale)
  skip = np.asarray(params["D"])[None, None, :] * np.asarray(U)
  assert rel_err(ref - skip, ref) > 0.05, "the SSM path must matter, not just D u"
  assert len(outs) == len(ssm_layers.MODES[variant]) >= 2
  for mode, got in outs.items():
    assert rel_err(got, ref) < RTOL, mode


@pytest.mark.parametrize("variant", sorted(LAYERS))
def test_layer_resets_state_at_segment_boundaries_in_every_mode(variant):
  outs = variant_results(variant)["segments"]
  assert len(outs) == len(ssm_layers.MODES[variant])
  for mode, (packed, plain) in outs.items():
    assert rel_err(packed[0, :4], plain[2, :4]) < RTOL, mode  # first segment
    assert rel_err(packed[0, 4:9], plain[1, :5]) < RTOL, mode  # second segment, state reset
    assert rel_err(packed[1, :5], plain[1, :5]) < RTOL, mode
    assert rel_err(packed[2], plain[2]) < RTOL, mode  # conv mode: scan branch == FFT branch
    assert rel_err(plain[0, :7], plain[2, :7]) < RTOL, mode  # right padding changes nothing
    assert rel_err(plain[2, 4:9], plain[1, :5]) > 1e-3, "without a reset the state carries over"


# ---------------------------------------------------------------------------------------------
# the language model: three configurations; each test compiles one function for all three
# ---------------------------------------------------------------------------------------------
LM_CONFIGS = {
  "s4d": dict(variant="s4d", init="lin", discretization="zoh"),
  "s5": dict(variant="s5", init="inv", discretization="bilinear", tie_embeddings=False),
  "selective": dict(variant="selective", init="real", discretization="zoh", conv_width=3),
}
NAMES = sorted(LM_CONFIGS)
LM_BASE = dict(vocab_size=32, d_model=16, n_layers=2, d_state=8, dt_min=0.02, dt_max=0.3)


def lm(name, **kw):
  return SSMLM(SSMConfig(**{**LM_BASE, **LM_CONFIGS[name], **kw}))


@functools.lru_cache(maxsize=None)
def all_params():
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jit(lambda r: {n: nn.unbox(lm(n).init(r, tokens))["params"] for n in NAMES})
  return init(jax.random.PRNGKey(0))


def lm1(name, **kw):
  """The one-layer model whose parameters are ``all_params()[name]`` without ``layer_1``."""
  return lm(name, n_layers=1, **kw)


def lm1_params(name):
  return {k: v for k, v in all_params()[name].items() if k != "layer_1"}


def test_cached_decoding_equals_full_forward():
  params = all_params()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 3, 32)
  other_tokens = tokens.at[:, 0].set(tokens[:, 0] % 29 + 3)
  forward = jit(lambda ts: {n: [lm(n).apply({"params": params[n]}, t) for t in ts] for n in NAMES})
  step = jit(
    lambda caches, t: {
      n: lm(n).apply({"params": params[n], "cache": caches[n]}, t, decode=True, mutable=["cache"])
      for n in NAMES
    }
  )
  caches0 = {n: init_cache(lm(n).config, 2) for n in NAMES}
  outs = forward([tokens, other_tokens])
  stepped = [step(caches0, tokens[:, :1])]
  for t in range(1, tokens.shape[1]):
    stepped.append(step({n: stepped[-1][n][1]["cache"] for n in NAMES}, tokens[:, t : t + 1]))
  prefilled = [step(caches0, tokens[:, :5])]  # prefill, then one token at a time
  for t in range(5, tokens.shape[1]):
    prefilled.append(step({n: prefilled[-1][n][1]["cache"] for n in NAMES}, tokens[:, t : t + 1]))
  for n in NAMES:
    full, other = outs[n]
    # the state carries information: changing the first token moves the last logits
    assert rel_err(other[:, -1], full[:, -1]) > 1e-3, n
    assert rel_err(jnp.concatenate([o[n][0] for o in stepped], 1), full) < RTOL, n
    assert rel_err(jnp.concatenate([o[n][0] for o in prefilled], 1), full) < RTOL, n
    assert all(o[n][0].dtype == jnp.float32 for o in stepped)
    # cache: zeros from init(decode=True), batch-leading leaves, no dependence on length
    model = lm(n)
    leaves = jax.tree.leaves(caches0[n])
    assert leaves and all(x.ndim >= 2 and x.shape[0] == 2 and not np.any(x) for x in leaves)
    for length in (1, 50):
      shapes = jax.eval_shape(
        functools.partial(model.init, decode=True),
        jax.random.PRNGKey(0),
        jnp.zeros((2, length), jnp.int32),
      )["cache"]
      assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, caches0[n]), n
  fresh = jit(functools.partial(lm("s5").init, decode=True))(jax.random.PRNGKey(0), tokens[:, :3])[
    "cache"
  ]
  assert not any(np.any(x) for x in jax.tree.leaves(fresh))  # init leaves the cache at zero


CAUSAL_CASES = [
  ("s4d", "conv"),
  ("s4d", "recurrent"),
  ("s5", "conv"),
  ("s5", "scan"),
  ("selective", "scan"),
]


def test_causality_gradients_after_t_are_zero():
  length = 7
  tokens = jnp.arange(10, 10 + length)[None, :]
  # weights of the summed logits; zero on the replaced rows so a tied head cannot read them
  weights = jnp.arange(32.0).at[10 : 10 + length].set(0.0)

  def per_position(x, name, mode):
    params = lm1_params(name)
    table = params["token_embed"]["embedding"].at[10 : 10 + length].set(x[0])
    p = {**params, "token_embed": {"embedding": table}}
    return jnp.sum(
      lm1(name, train_mode=mode).apply({"params": p}, tokens)[0] * weights[None, :], -1
    )

  xs = {n: jnp.take(lm1_params(n)["token_embed"]["embedding"], tokens, axis=0) for n in NAMES}
  jac = jit(lambda xs: [jax.jacrev(per_position)(xs[n], n, m) for n, m in CAUSAL_CASES])(xs)
  for (name, mode), j in zip(CAUSAL_CASES, jac):
    j = np.asarray(j)  # [t, 1, s, D]: d output_t / d embedding_s
    for t in range(length):
      past = np.abs(j[t, 0, : t + 1]).max()
      assert past > 0, (name, mode, t)
      future = np.abs(j[t, 0, t + 1 :]).max(initial=0.0)
      if mode == "conv":  # FFT round-off only
        assert future <= 1e-6 * past, (name, mode, t)
      else:
        assert future == 0.0, (name, mode, t)


def test_packed_lm_equals_separate_sequences():
  z = [0, 0, 0, 0]
  tokens = jnp.array([[3, 4, 5, 6, 7, 8, 9, 0], [3, 4, 5, 6] + z, [7, 8, 9, 0] + z])
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1] + z, [1, 1, 1, 0] + z])
  outs = jit(
    lambda: {n: lm1(n).apply({"params": lm1_params(n)}, tokens, segment_ids_BxL=seg) for n in NAMES}
  )()
  for n, out in outs.items():
    assert rel_err(out[0, :4], out[1, :4]) < RTOL, n
    assert rel_err(out[0, 4:7], out[2, :3]) < RTOL, n
    assert rel_err(out[0, 4:7], out[1, 4:7]) > 1e-3, n  # the comparison can fail


def test_sharded_forward_and_grad_equal_single_device():
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 8), 3, 32)
  params = {n: lm1_params(n) for n in NAMES}

  def loss_and_grad(remat):
    def loss(p, toks):
      total, logits = 0.0, {}
      for n in NAMES:  # nn.remat (sharded run, s4d) must not change values
        logits[n] = lm1(n, remat=remat and n == "s4d").apply({"params": p[n]}, toks)
        logp = jax.nn.log_softmax(logits[n][:, :-1], -1)
        total = total - jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))
      return total, logits

    return jax.value_and_grad(loss, has_aux=True)

  (l1, logits1), g1 = jit(loss_and_grad(False))(params, tokens)
  mesh = sharding.make_mesh((2, 2, 2))
  abstract = jax.eval_shape(
    lambda r: {n: lm1(n).init(r, tokens)["params"] for n in NAMES}, jax.random.PRNGKey(0)
  )
  shardings = sharding.tree_shardings(mesh, abstract)
  for n in NAMES:  # parameters really are split
    assert tuple(shardings[n]["layer_0"]["in_proj"]["kernel"].spec) == ("fsdp", "tensor")
  batch = sharding.batch_sharding(mesh, 2)
  with sharding.use_mesh(mesh):
    fn = jit(loss_and_grad(True), in_shardings=(shardings, batch))
    (l2, logits2), g2 = fn(jax.device_put(params, shardings), jax.device_put(tokens, batch))
  assert rel_err(l2, l1) < RTOL
  for n in NAMES:
    assert len(logits2[n].sharding.device_set) == 8
    assert rel_err(logits2[n], logits1[n]) < RTOL, n
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1)):
    assert rel_err(a, b) < 1e-3 or np.max(np.abs(np.asarray(a) - np.asarray(b))) < 1e-7, path


def test_prefix_lm_adapter_decoding_equals_scoring():
  model = build_model(dict(family="ssm", **{**LM_BASE, "n_layers": 1}, **LM_CONFIGS["selective"]))
  batch = dict(
    inputs=jnp.array([[5, 6, 7, 9, 0], [8, 9, 0, 0, 0]]),
    targets=jnp.array([[10, 11, 1, 0], [12, 13, 14, 1]]),
  )
  params = lm1_params("selective")
  tf = jit(lambda p: scoring.score_targets(model, p, batch)["logits"])(params)
  step, tokens, cache = model.decode_state(params, batch["inputs"], max_len=4)
  step = jit(step)
  lengths = np.sum(np.asarray(batch["targets"]) != 0, axis=1)
  for t in range(batch["targets"].shape[1]):
    logits, cache = step(tokens, cache)
    rows = lengths > t
    assert rel_err(logits[rows], tf[rows, t]) < RTOL
    tokens = batch["targets"][:, t]


def test_every_param_has_logical_names_and_bf16_compute():
  for name in NAMES:
    boxed = jax.eval_shape(lm(name).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves), name
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 3, 32)
  params = lm1_params("s4d")
  low, high = jit(
    lambda: [lm1("s4d", dtype=d).apply({"params": params}, tokens) for d in ("bfloat16", "float32")]
  )()
  assert low.dtype == jnp.float32
  assert 1e-5 < rel_err(low, high) < 0.05  # bfloat16 really used, and close


def test_bad_configs_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown SSM variant"):
    SSMConfig(variant="lstm")
  with pytest.raises(ValueError, match="must be even"):
    SSMConfig(d_state=7, init="lin")
  SSMConfig(d_state=7, init="real")  # real modes need no pairs
  with pytest.raises(ValueError, match="not available for variant 'selective'"):
    SSMConfig(variant="selective", train_mode="conv")
  with pytest.raises(ValueError, match="unknown discretization"):
    SSMConfig(discretization="euler")
  with pytest.raises(ValueError, match="unknown SSM init"):
    SSMConfig(init="hippo")
  with pytest.raises(ValueError, match="unknown ssm config key"):
    build_model(dict(family="ssm", d_modle=8))
  model, params = lm1("s4d"), lm1_params("s4d")
  with pytest.raises(ValueError, match="tokens must be"):
    model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids shape"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), segment_ids_BxL=jnp.ones((1, 3)))
