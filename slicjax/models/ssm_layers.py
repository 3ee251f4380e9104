"""State-space layers and the pure functions behind their computation modes.

Three diagonal SSMs map a ``[B, L, H]`` input to a ``[B, L, H]`` output (``H`` channels, ``N`` the
state size ``d_state``):

* :class:`S4D` - one single-input single-output SSM per channel with a diagonal complex ``A``
  (Gu et al., 2022). ``mode="conv"``: the kernel ``K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)`` by a
  Vandermonde product and a causal convolution by FFT in ``O(L log L)``; ``"scan"``: the
  associative scan; ``"recurrent"``: the step ``x_k = Abar x_{k-1} + Bbar u_k`` in a loop.
* :class:`S5` - one multi-input multi-output diagonal SSM over all channels (Smith et al., 2023),
  trained with ``jax.lax.associative_scan``; ``"conv"`` (a ``[L, H, H]`` kernel) and
  ``"recurrent"`` compute the same map.
* :class:`Selective` - Mamba-style (Gu & Dao, 2023): ``Delta = softplus(W x + b)``, ``B`` and
  ``C`` are projections of the input, ``A = -exp(A_log)``; ``"scan"`` or ``"recurrent"``.

Diagonal ``A`` init (``a_init``): ``lin`` (S4D-Lin, ``A_n = -1/2 + i pi n``), ``inv`` (S4D-Inv,
``A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)``) - complex, stored as ``N/2`` modes whose conjugates are
implicit, so outputs are ``2 Re(C x)`` - or ``real`` (S4D-Real, ``A_n = -(n+1)``, ``N`` real modes,
output ``C x``). Discretization (``zoh`` or ``bilinear``) uses a learned ``log Delta`` (S4D per
channel, S5 per state) initialized log-uniform in ``[dt_min, dt_max]``.

Packed sequences: ``segment_ids_BxL`` resets the state where a new non-zero segment starts (id 0
is padding). The scan and recurrent modes reset by zeroing ``Abar`` there; the LTI convolution
cannot, so ``mode="conv"`` switches (``lax.cond``) to the scan for batches holding a segment
boundary and keeps the FFT for plain (right-padded) batches.

Decoding (``decode=True``): the ``cache`` collection holds ``ssm_state`` (batch-leading; complex
states are stored as float32 ``[..., 2]`` real/imaginary pairs). ``L = 1`` is one recurrent
step; ``L > 1`` (prefill) continues the cached state with the associative scan.

The SSM arithmetic always runs in float32 / complex64, whatever the compute dtype of the model.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
INITS = ("lin", "inv", "real")
DISCRETIZATIONS = ("zoh", "bilinear")
MODES = {
  "s4d": ("conv", "scan", "recurrent"),
  "s5": ("conv", "scan", "recurrent"),
  "selective": ("scan", "recurrent"),
}


# --------------------------------------------------------------------------------------------
# Pure functions (tested directly).
# --------------------------------------------------------------------------------------------
def n_modes(init: str, d_state: int) -> int:
  """Stored modes: ``N/2`` conjugate-pair representatives for complex inits, ``N`` for real."""
  if init not in INITS:
    raise ValueError(f"unknown SSM init {init!r}; use one of {INITS}.")
  if init == "real":
    return d_state
  if d_state % 2:
    raise ValueError(
      f"d_state={d_state} must be even for the complex init {init!r} (N/2 conjugate pairs); "
      "use an even d_state or init='real'."
    )
  return d_state // 2


def diagonal_a(init: str, d_state: int) -> tuple[np.ndarray, np.ndarray]:
  """``(Re A, Im A)`` of the stored modes for ``init`` and state size ``N = d_state``."""
  m = n_modes(init, d_state)
  n = np.arange(m, dtype=np.float64)
  if init == "lin":
    return np.full(m, -0.5), np.pi * n
  if init == "inv":
    return np.full(m, -0.5), (d_state / np.pi) * (d_state / (2 * n + 1) - 1)
  return -(n + 1), np.zeros(m)


def discretize(a, b, dt, method: str):
  """``(Abar, Bbar)`` for ``x' = a x + b u`` with step ``dt`` (all broadcast, same rank).

  ZOH: ``Abar = exp(dt a)``, ``Bbar = (exp(dt a) - 1) / a * b``.
  Bilinear: ``Abar = (1 + dt a / 2) / (1 - dt a / 2)``, ``Bbar = dt / (1 - dt a / 2) * b``.
  """
  dta = dt * a
  if method == "zoh":
    return jnp.exp(dta), jnp.expm1(dta) / a * b
  if method == "bilinear":
    denom = 1.0 - dta / 2.0
    return (1.0 + dta / 2.0) / denom, dt / denom * b
  raise ValueError(f"unknown discretization {method!r}; use one of {DISCRETIZATIONS}.")


def vandermonde_kernel(abar_HxM, w_HxM, length: int, scale: float):
  """``K[h, l] = scale * Re(sum_m w[h, m] abar[h, m]^l)``, ``[H, L]`` float32.

  ``w = C * Bbar``; ``scale`` is 2 for conjugate-pair (complex) modes and 1 for real modes.
  """
  log_a = jnp.log(abar_HxM.astype(jnp.complex64))
  powers_HxMxL = jnp.exp(log_a[:, :, None] * jnp.arange(length, dtype=jnp.float32)[None, None, :])
  k_HxL = jnp.einsum("hm,hml->hl", w_HxM.astype(jnp.complex64), powers_HxMxL)
  return (scale * jnp.real(k_HxL)).astype(jnp.float32)


def _fft_len(length: int) -> int:
  return 1 << (2 * length - 1).bit_length()


def causal_fft_conv(u_BxLxH, k_HxL):
  """``y[b, t, h] = sum_{s <= t} k[h, t - s] u[b, s, h]`` by zero-padded FFT (no wrap-around)."""
  length = u_BxLxH.shape[1]
  n = _fft_len(length)
  u_f = jnp.fft.rfft(u_BxLxH.astype(jnp.float32), n=n, axis=1)
  k_f = jnp.fft.rfft(k_HxL.astype(jnp.float32), n=n, axis=1).T
  return jnp.fft.irfft(u_f * k_f[None, :, :], n=n, axis=1)[:, :length]


def causal_fft_conv_mimo(u_BxLxG, k_LxHxG):
  """``y[b, t, h] = sum_{s <= t} sum_g k[t - s, h, g] u[b, s, g]`` by FFT."""
  length = u_BxLxG.shape[1]
  n = _fft_len(length)
  u_f = jnp.fft.rfft(u_BxLxG.astype(jnp.float32), n=n, axis=1)
  k_f = jnp.fft.rfft(k_LxHxG.astype(jnp.float32), n=n, axis=0)
  return jnp.fft.irfft(jnp.einsum("bfg,fhg->bfh", u_f, k_f), n=n, axis=1)[:, :length]


def _combine(left, right):
  """The scan operator ``(a_i, b_i) o (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``."""
  a_i, b_i = left
  a_j, b_j = right
  return a_j * a_i, a_j * b_i + b_j


def _start_state(a_BxLx, b_BxLx, x0):
  if x0 is None:
    return b_BxLx
  return b_BxLx.at[:, 0].add(a_BxLx[:, 0] * x0)


def linear_scan(a_BxLx, b_BxLx, x0=None):
  """All states of ``x_t = a_t x_{t-1} + b_t`` (``x_{-1} = x0`` or 0) by associative scan."""
  a = jnp.broadcast_to(a_BxLx, b_BxLx.shape)
  _, x = jax.lax.associative_scan(_combine, (a, _start_state(a, b_BxLx, x0)), axis=1)
  return x


def linear_recurrence(a_BxLx, b_BxLx, x0=None):
  """The same states as :func:`linear_scan`, one step at a time (``lax.scan`` over L)."""
  a = jnp.broadcast_to(a_BxLx, b_BxLx.shape)
  if x0 is None:
    x0 = jnp.zeros(b_BxLx.shape[:1] + b_BxLx.shape[2:], b_BxLx.dtype)

  def step(x, ab):
    x = ab[0] * x + ab[1]
    return x, x

  _, xs = jax.lax.scan(step, x0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b_BxLx, 1, 0)))
  return jnp.moveaxis(xs, 0, 1)


def segment_starts(segment_ids_BxL):
  """True where a new non-zero segment begins after a different id (never at position 0)."""
  seg = segment_ids_BxL
  changed = seg[:, 1:] != seg[:, :-1]
  starts = changed & (seg[:, 1:] != 0)
  return jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), starts], axis=1)


def _expand_to(x_BxL, ndim: int):
  return x_BxL.reshape(x_BxL.shape + (1,) * (ndim - 2))


def _states(a, b, mode: str, x0=None, resets_BxL=None):
  a = jnp.broadcast_to(a, b.shape)
  if resets_BxL is not None:
    a = jnp.where(_expand_to(resets_BxL, a.ndim), jnp.zeros((), a.dtype), a)
  if mode == "recurrent":
    return linear_recurrence(a, b, x0)
  return linear_scan(a, b, x0)


def _decode_hold(segment_ids_BxL, decode: bool):
  """Decode mode: where the state holds (padding, ``segment_ids == 0``, in a ragged prefill);
  None when no segment ids are given."""
  if not decode or segment_ids_BxL is None:
    return None
  return segment_ids_BxL == 0


def causal_depthwise_conv(
  x_BxLxE, kernel_KxE, bias_E, prefix_BxK1xE=None, segment_ids_BxL=None, lengths_B=None
):
  """Short causal depthwise convolution (Mamba): ``y_t = bias + sum_j w_j x_{t-(K-1)+j}``.

  ``prefix_BxK1xE`` holds the ``K - 1`` inputs before ``x`` (decoding cache; zeros otherwise).
  With ``segment_ids_BxL``, taps reaching into another segment are dropped. Returns
  ``(y_BxLxE, new_prefix_BxK1xE)``: the ``K - 1`` inputs ending at position ``L - 1``, or at
  each row's ``lengths_B - 1`` when given (a ragged prefill whose rows end early).
  """
  b, length, e = x_BxLxE.shape
  k = kernel_KxE.shape[0]
  if prefix_BxK1xE is None:
    prefix_BxK1xE = jnp.zeros((b, k - 1, e), x_BxLxE.dtype)
  xp = jnp.concatenate([prefix_BxK1xE.astype(x_BxLxE.dtype), x_BxLxE], axis=1)
  y = jnp.broadcast_to(bias_E.astype(x_BxLxE.dtype)[None, None, :], x_BxLxE.shape)
  if segment_ids_BxL is not None:
    seg_p = jnp.concatenate([jnp.full((b, k - 1), -1, segment_ids_BxL.dtype), segment_ids_BxL], 1)
  for j in range(k):
    tap = xp[:, j : j + length] * kernel_KxE[j].astype(x_BxLxE.dtype)[None, None, :]
    if segment_ids_BxL is not None and j < k - 1:
      same = seg_p[:, j : j + length] == segment_ids_BxL
      tap = jnp.where(same[:, :, None], tap, jnp.zeros((), tap.dtype))
    y = y + tap
  if lengths_B is not None:
    idx_BxK1 = lengths_B[:, None] + jnp.arange(k - 1)[None, :]
    return y, jnp.take_along_axis(xp, idx_BxK1[:, :, None], axis=1)
  return y, xp[:, xp.shape[1] - (k - 1) :]


def _log_uniform(lo: float, hi: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi))

  return init


def _const(values: np.ndarray):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(values, dtype), shape)

  return init


def _symmetric_uniform(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _scaled_normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------
class _DiagonalSSM(nn.Module):
  """Shared parameter and cache helpers."""

  d_state: int = 16
  a_init: str = "lin"
  discretization: str = "zoh"
  mode: str = "scan"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  param_dtype: Dtype = jnp.float32

  @property
  def is_complex(self) -> bool:
    return self.a_init != "real"

  @property
  def scale(self) -> float:
    return 2.0 if self.is_complex else 1.0

  def _param(self, name, init_fn, shape, names):
    p = self.param(name, nn.with_logical_partitioning(init_fn, names), shape, self.param_dtype)
    return p.astype(jnp.float32)

  def _maybe_complex(self, name, init_re, init_im, shape, names):
    re = self._param(name + "_re", init_re, shape, names)
    if not self.is_complex:
      return re
    return jax.lax.complex(re, self._param(name + "_im", init_im, shape, names))

  def _a(self, shape, names):
    re, im = diagonal_a(self.a_init, self.d_state)
    a_log = self._param("A_log", _const(np.log(-re)), shape, names)
    a = -jnp.exp(a_log)
    if not self.is_complex:
      return a
    return jax.lax.complex(a, self._param("A_im", _const(im), shape, names))

  def _check_mode(self, variant):
    if self.mode not in MODES[variant]:
      raise ValueError(f"mode {self.mode!r} is not available for {variant}; use {MODES[variant]}.")
    if self.discretization not in DISCRETIZATIONS:
      raise ValueError(
        f"unknown discretization {self.discretization!r}; use one of {DISCRETIZATIONS}."
      )

  def _run(self, a, b, decode: bool, resets_BxL, mode: str, hold_BxL=None):
    """States for all positions; in decode mode starts from and updates the cached state.

    ``hold_BxL`` (decode prefill only): True at a row's trailing padding, where the state is
    carried unchanged (``a = 1, b = 0``), so the cached state is the one after the row's last
    real token; a ragged batch of prompts is prefilled in one scan."""
    if not decode:
      return _states(a, b, mode, None, resets_BxL)
    state_shape = b.shape[:1] + b.shape[2:]
    stored = state_shape + ((2,) if self.is_complex else ())
    is_init = not self.has_variable("cache", "ssm_state")
    cache = self.variable("cache", "ssm_state", jnp.zeros, stored, jnp.float32)
    x0 = cache.value
    if self.is_complex:
      x0 = jax.lax.complex(x0[..., 0], x0[..., 1])
    if hold_BxL is not None:
      a = jnp.broadcast_to(a, b.shape)
      hold = _expand_to(hold_BxL, a.ndim)
      a = jnp.where(hold, jnp.ones((), a.dtype), a)
      b = jnp.where(hold, jnp.zeros((), b.dtype), b)
    if b.shape[1] == 1:  # one recurrent step, O(1) per token
      xs = (jnp.broadcast_to(a, b.shape)[:, 0] * x0 + b[:, 0])[:, None]
    else:
      xs = _states(a, b, "scan", x0, None)
    if not is_init:
      last = xs[:, -1]
      cache.value = jnp.stack([jnp.real(last), jnp.imag(last)], -1) if self.is_complex else last
    return xs


class S4D(_DiagonalSSM):
  """S4D: ``H`` independent SISO diagonal SSMs, ``y = 2 Re(C x) + D u`` (``C x`` for ``real``)."""

  mode: str = "conv"

  @nn.compact
  def __call__(self, u_BxLxH, segment_ids_BxL=None, decode=False):
    self._check_mode("s4d")
    h = u_BxLxH.shape[-1]
    m = n_modes(self.a_init, self.d_state)
    names = ("mlp", "ssm_state")
    a_HxM = self._a((h, m), names)
    b_HxM = self._maybe_complex("B", nn.initializers.ones, nn.initializers.zeros, (h, m), names)
    c_std = math.sqrt(0.5) if self.is_complex else 1.0
    c_HxM = self._maybe_complex("C", _scaled_normal(c_std), _scaled_normal(c_std), (h, m), names)
    d_H = self._param("D", nn.initializers.ones, (h,), ("mlp",))
    dt_H = jnp.exp(self._param("log_dt", _log_uniform(self.dt_min, self.dt_max), (h,), ("mlp",)))
    abar_HxM, bbar_HxM = discretize(a_HxM, b_HxM, dt_H[:, None], self.discretization)
    u = u_BxLxH.astype(jnp.float32)
    skip = u * d_H[None, None, :]
    length = u.shape[1]
    resets = None if segment_ids_BxL is None or decode else segment_starts(segment_ids_BxL)
    hold = _decode_hold(segment_ids_BxL, decode)

    def by_scan(u, mode="scan"):
      b = bbar_HxM[None, None] * u[:, :, :, None].astype(bbar_HxM.dtype)
      xs = self._run(abar_HxM[None, None], b, decode, resets, mode, hold)
      return self.scale * jnp.real(jnp.einsum("blhm,hm->blh", xs, c_HxM))

    def by_conv(u):
      k_HxL = vandermonde_kernel(abar_HxM, c_HxM * bbar_HxM, length, self.scale)
      return causal_fft_conv(u, k_HxL)

    if decode or self.mode != "conv":
      y = by_scan(u, "recurrent" if self.mode == "recurrent" and not decode else "scan")
    elif resets is None:
      y = by_conv(u)
    else:
      y = jax.lax.cond(jnp.any(resets), by_scan, by_conv, u)
    return y + skip


class S5(_DiagonalSSM):
  """S5: one MIMO diagonal SSM over all ``H`` channels with ``P`` modes (``d_state`` states)."""

  @nn.compact
  def __call__(self, u_BxLxH, segment_ids_BxL=None, decode=False):
    self._check_mode("s5")
    h = u_BxLxH.shape[-1]
    p = n_modes(self.a_init, self.d_state)
    part = math.sqrt(0.5) if self.is_complex else 1.0
    a_P = self._a((p,), ("ssm_state",))
    b_init = _scaled_normal(part / math.sqrt(h))
    b_PxH = self._maybe_complex("B", b_init, b_init, (p, h), ("ssm_state", "mlp"))
    c_init = _scaled_normal(part / math.sqrt(self.d_state))
    c_HxP = self._maybe_complex("C", c_init, c_init, (h, p), ("mlp", "ssm_state"))
    d_H = self._param("D", nn.initializers.ones, (h,), ("mlp",))
    dt_P = jnp.exp(
      self._param("log_dt", _log_uniform(self.dt_min, self.dt_max), (p,), ("ssm_state",))
    )
    abar_P, bbar_PxH = discretize(a_P[:, None], b_PxH, dt_P[:, None], self.discretization)
    abar_P = abar_P[:, 0]
    u = u_BxLxH.astype(jnp.float32)
    skip = u * d_H[None, None, :]
    length = u.shape[1]
    resets = None if segment_ids_BxL is None or decode else segment_starts(segment_ids_BxL)
    hold = _decode_hold(segment_ids_BxL, decode)

    def by_scan(u, mode="scan"):
      b_BxLxP = jnp.einsum("blh,ph->blp", u.astype(bbar_PxH.dtype), bbar_PxH)
      xs = self._run(abar_P[None, None], b_BxLxP, decode, resets, mode, hold)
      return self.scale * jnp.real(jnp.einsum("blp,hp->blh", xs, c_HxP))

    def by_conv(u):
      log_a = jnp.log(abar_P.astype(jnp.complex64))
      pow_LxP = jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None] * log_a[None, :])
      k_LxHxG = self.scale * jnp.real(
        jnp.einsum("hp,lp,pg->lhg", c_HxP.astype(jnp.complex64), pow_LxP, bbar_PxH)
      )
      return causal_fft_conv_mimo(u, k_LxHxG)

    if decode or self.mode != "conv":
      y = by_scan(u, "recurrent" if self.mode == "recurrent" and not decode else "scan")
    elif resets is None:
      y = by_conv(u)
    else:
      y = jax.lax.cond(jnp.any(resets), by_scan, by_conv, u)
    return y + skip


class Selective(_DiagonalSSM):
  """Selective SSM: input-dependent ``Delta``, ``B``, ``C``; ``A = -exp(A_log)`` per channel.

  ``Delta = softplus(W_up W_down x + b)`` (rank ``dt_rank``, ``b`` set so that ``Delta`` starts
  log-uniform in ``[dt_min, dt_max]``); ``B_t = W_B x_t``, ``C_t = W_C x_t`` are shared by all
  channels. ``discretization="zoh"`` uses the exact ZOH ``Bbar = (exp(Delta A) - 1) / A * B``
  (Mamba's reference code uses the Euler shortcut ``Delta B``). Complex inits give complex
  ``B_t``/``C_t`` (real and imaginary parts from one projection each).
  """

  dt_rank: int = 4
  dtype: Dtype = jnp.float32  # compute dtype of the input-dependent projections

  @nn.compact
  def __call__(self, u_BxLxH, segment_ids_BxL=None, decode=False):
    self._check_mode("selective")
    h = u_BxLxH.shape[-1]
    m = n_modes(self.a_init, self.d_state)
    names = ("mlp", "ssm_state")
    a_HxM = self._a((h, m), names)
    d_H = self._param("D", nn.initializers.ones, (h,), ("mlp",))

    def dense(name, feats, kernel_names, bias_init=None, kernel_init=None):
      return nn.Dense(
        feats,
        use_bias=bias_init is not None,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
          kernel_init or nn.initializers.variance_scaling(1.0, "fan_in", "normal"), kernel_names
        ),
        bias_init=nn.with_logical_partitioning(
          bias_init or nn.initializers.zeros, kernel_names[1:]
        ),
        name=name,
      )

    def dt_bias_init(key, shape, dtype=jnp.float32):
      dt = jnp.exp(_log_uniform(self.dt_min, self.dt_max)(key, shape, jnp.float32))
      return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)

    x = u_BxLxH.astype(self.dtype)
    low = dense("dt_in", self.dt_rank, ("mlp", None))(x)
    dt_raw = dense(
      "dt_proj",
      h,
      (None, "mlp"),
      bias_init=dt_bias_init,
      kernel_init=_symmetric_uniform(self.dt_rank**-0.5),
    )(low)
    dt_BxLxH = jax.nn.softplus(dt_raw.astype(jnp.float32))
    width = 2 * m if self.is_complex else m
    b_raw = dense("B_proj", width, ("mlp", "ssm_state"))(x).astype(jnp.float32)
    c_raw = dense("C_proj", width, ("mlp", "ssm_state"))(x).astype(jnp.float32)
    if self.is_complex:
      b_BxLxM = jax.lax.complex(b_raw[..., :m], b_raw[..., m:])
      c_BxLxM = jax.lax.complex(c_raw[..., :m], c_raw[..., m:])
    else:
      b_BxLxM, c_BxLxM = b_raw, c_raw
    u = u_BxLxH.astype(jnp.float32)
    abar, bbar = discretize(
      a_HxM[None, None], b_BxLxM[:, :, None, :], dt_BxLxH[..., None], self.discretization
    )
    bu = bbar * u[..., None].astype(bbar.dtype)
    resets = None if segment_ids_BxL is None or decode else segment_starts(segment_ids_BxL)
    hold = _decode_hold(segment_ids_BxL, decode)
    mode = "recurrent" if self.mode == "recurrent" and not decode else "scan"
    xs = self._run(abar, bu, decode, resets, mode, hold)
    y = self.scale * jnp.real(jnp.einsum("blhm,blm->blh", xs, c_BxLxM))
    return y + u * d_H[None, None, :]
