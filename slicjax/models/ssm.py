"""State-space language models: S4D, S5 and selective (Mamba-style) decoders.

Call contract (the same as :class:`~slicjax.models.transformer.TransformerLM`, so adapters,
scoring and decoding treat both alike)::

    logits_BxLxV = SSMLM(config).apply({"params": p}, tokens_BxL, positions_BxL=None,
        segment_ids_BxL=None, decode=False, deterministic=True, return_hidden=False)

* ``return_hidden=True`` returns ``(logits_BxLxV, hidden_BxLxD)``, the final-norm output states.
* ``positions_BxL`` is accepted and ignored: the recurrence itself encodes order.
* ``segment_ids_BxL`` (packing; 0 is padding) resets every layer's state - SSM and short
  convolution - where a new segment starts, in every training mode.
* ``decode=True``: apply with ``{"params": p, "cache": c}`` and ``mutable=["cache"]``;
  ``tokens_BxL`` continues each row's sequence (``L = 1``: one O(1) recurrent step; ``L > 1``:
  prefill by associative scan). ``SSMLM(config).init(rng, tokens_BxL, decode=True)["cache"]`` is a
  zero cache whose size does not depend on length; every leaf is batch-leading. In decode mode
  ``segment_ids_BxL`` (optional) marks each row's real tokens: where it is 0 (a ragged prompt's
  trailing padding) the state and the convolution cache hold, so ``prefill`` runs a batch of
  prompts of different lengths in one scan.

Each residual block (pre-RMSNorm) is Mamba-shaped: ``x -> in_proj`` and ``x -> gate_proj`` (both
``D -> E = expand * D``), a short causal depthwise convolution and SiLU on the first branch, the
SSM (``config.variant``), multiplication by ``SiLU(gate)``, ``out_proj`` back to ``D``.
Logits are float32.

The same blocks form the decoder of the encoder-decoder in ``models/ssm_encdec.py``
(``factory.build_model`` with ``family="ssm"`` and ``num_encoder_layers > 0``).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicjax.models import layers, ssm_layers
from slicjax.models.layers import constrain

VARIANTS = ("s4d", "s5", "selective")
_DEFAULT_MODE = {"s4d": "conv", "s5": "scan", "selective": "scan"}
_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")
_MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


@dataclasses.dataclass(frozen=True)
class SSMConfig:
  """Hyperparameters of :class:`SSMLM` (and of the decoder of ``ssm_encdec.SSMEncoderDecoder``,
  whose :class:`~slicjax.models.ssm_encdec.SSMEncDecConfig` extends this class with the encoder
  keys; ``factory.build_model`` picks it for ``family="ssm"`` with ``num_encoder_layers > 0``).

  Attributes:
    vocab_size: vocabulary size V.
    d_model: residual width D.
    n_layers: number of residual SSM blocks.
    d_state: state size N per SSM (complex inits store N/2 conjugate pairs).
    variant: ``"s4d"`` | ``"s5"`` | ``"selective"``.
    init: diagonal A init, ``"lin"`` | ``"inv"`` | ``"real"`` (S4D-Lin / -Inv / -Real).
    discretization: ``"zoh"`` | ``"bilinear"``.
    expand: inner width ``E = expand * d_model``.
    dropout: dropout rate on block outputs and embeddings (training only).
    dtype: compute dtype of projections, ``"float32"`` or ``"bfloat16"`` (the SSM recurrence
      always runs in float32).
    param_dtype: parameter dtype.
    remat: rematerialize each block in the backward pass (``nn.remat``).
    tie_embeddings: output logits from the token embedding table.
    conv_width: width of the short causal depthwise convolution before the SSM (0 disables).
    dt_min, dt_max: range of the log-uniform Delta init.
    dt_rank: rank of the selective Delta projection (0: ``ceil(d_model / 16)``).
    train_mode: how the non-decoding pass computes the SSM: ``"auto"`` (S4D: ``conv``, S5 and
      selective: ``scan``), ``"conv"`` (FFT; S4D and S5), ``"scan"`` or ``"recurrent"``.
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 2
  d_state: int = 16
  variant: str = "s4d"
  init: str = "lin"
  discretization: str = "zoh"
  expand: int = 2
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  tie_embeddings: bool = True
  conv_width: int = 4
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_rank: int = 0
  train_mode: str = "auto"
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "d_state", "expand"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"SSMConfig.{name}={getattr(self, name)} must be a positive integer.")
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown SSM variant {self.variant!r}; use one of {VARIANTS}.")
    ssm_layers.n_modes(self.init, self.d_state)  # validates init and d_state parity
    if self.discretization not in ssm_layers.DISCRETIZATIONS:
      raise ValueError(
        f"unknown discretization {self.discretization!r}; use one of {ssm_layers.DISCRETIZATIONS}."
      )
    if self.train_mode != "auto" and self.train_mode not in ssm_layers.MODES[self.variant]:
      raise ValueError(
        f"train_mode={self.train_mode!r} is not available for variant {self.variant!r}; use "
        f"'auto' or one of {ssm_layers.MODES[self.variant]}."
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must be in [0, 1).")
    if not 0.0 < self.dt_min <= self.dt_max:
      raise ValueError(
        f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}."
      )
    if self.conv_width < 0 or self.dt_rank < 0:
      raise ValueError("conv_width and dt_rank must be >= 0 (0 disables / picks the default).")
    layers.dtype_of(self.dtype), layers.dtype_of(self.param_dtype)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def mode(self) -> str:
    return _DEFAULT_MODE[self.variant] if self.train_mode == "auto" else self.train_mode

  @property
  def delta_rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)


def _dense(cfg: SSMConfig, feats: int, names, name: str):
  return nn.Dense(
    feats,
    use_bias=False,
    dtype=layers.dtype_of(cfg.dtype),
    param_dtype=layers.dtype_of(cfg.param_dtype),
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, "fan_in", "normal"), names
    ),
    name=name,
  )


def make_ssm(cfg: SSMConfig, name: str = "ssm") -> nn.Module:
  """The SSM layer of ``cfg.variant`` (``[B, L, E] -> [B, L, E]``)."""
  kw = dict(
    d_state=cfg.d_state,
    a_init=cfg.init,
    discretization=cfg.discretization,
    mode=cfg.mode,
    dt_min=cfg.dt_min,
    dt_max=cfg.dt_max,
    param_dtype=layers.dtype_of(cfg.param_dtype),
    name=name,
  )
  if cfg.variant == "s4d":
    return ssm_layers.S4D(**kw)
  if cfg.variant == "s5":
    return ssm_layers.S5(**kw)
  return ssm_layers.Selective(dt_rank=cfg.delta_rank, dtype=layers.dtype_of(cfg.dtype), **kw)


class SSMBlock(nn.Module):
  """Pre-norm gated SSM block with a residual connection."""

  cfg: SSMConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL=None):
    cfg = self.cfg
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    e = cfg.d_inner
    h = layers.RMSNorm(cfg.norm_eps, dt, pdt, name="norm")(x_BxLxD)
    u = constrain(_dense(cfg, e, ("embed", "mlp"), "in_proj")(h), _MLP_AXES)
    gate = constrain(_dense(cfg, e, ("embed", "mlp"), "gate_proj")(h), _MLP_AXES)
    seg = None if self.decode else segment_ids_BxL
    # Decode prefill of a ragged batch: segment ids mark each row's real tokens (trailing 0s are
    # padding), so states and the convolution cache stop at the row's last real token.
    valid = segment_ids_BxL if self.decode else None
    k = cfg.conv_width
    if k > 0:
      kernel = self.param(
        "conv_kernel",
        nn.with_logical_partitioning(nn.initializers.uniform(2 / math.sqrt(k)), (None, "mlp")),
        (k, e),
        pdt,
      )
      kernel = kernel - 1 / math.sqrt(k)  # U[-1/sqrt(k), 1/sqrt(k)]
      bias = self.param(
        "conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (e,), pdt
      )
      prefix = None
      if self.decode:
        is_init = not self.has_variable("cache", "conv_state")
        conv_cache = self.variable(
          "cache", "conv_state", jnp.zeros, (u.shape[0], k - 1, e), jnp.float32
        )
        prefix = conv_cache.value
      # a ragged prefill keeps the k - 1 inputs ending at each row's last real token
      n_B = None if valid is None else jnp.sum((valid != 0).astype(jnp.int32), axis=1)
      u, new_prefix = ssm_layers.causal_depthwise_conv(u, kernel, bias, prefix, seg, n_B)
      if self.decode and not is_init:
        conv_cache.value = new_prefix.astype(jnp.float32)
    u = nn.silu(u)
    y = make_ssm(cfg)(u, valid if self.decode else seg, decode=self.decode).astype(dt)
    y = constrain(y * nn.silu(gate), _MLP_AXES)
    out = _dense(cfg, x_BxLxD.shape[-1], ("mlp", "embed"), "out_proj")(y)
    if cfg.dropout > 0 and not self.deterministic:
      out = nn.Dropout(cfg.dropout)(out, deterministic=False)
    return constrain(x_BxLxD + out.astype(x_BxLxD.dtype), _EMBED_AXES)


class SSMLM(nn.Module):
  """Decoder-only state-space language model (see the module docstring for the contract)."""

  config: SSMConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxL,
    positions_BxL=None,
    segment_ids_BxL=None,
    decode=False,
    deterministic=True,
    return_hidden=False,
  ):
    del positions_BxL  # order is carried by the recurrence
    cfg = self.config
    if tokens_BxL.ndim != 2:
      raise ValueError(
        f"tokens must be [B, L] integers, got shape {tokens_BxL.shape}; add a batch axis."
      )
    if segment_ids_BxL is not None and segment_ids_BxL.shape != tokens_BxL.shape:
      raise ValueError(
        f"segment_ids shape {segment_ids_BxL.shape} must equal tokens shape {tokens_BxL.shape}."
      )
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, dt, pdt, name="token_embed")
    x = constrain(embed(tokens_BxL), _EMBED_AXES)
    if cfg.dropout > 0 and not deterministic:
      x = nn.Dropout(cfg.dropout)(x, deterministic=False)
    block_cls = nn.remat(SSMBlock) if cfg.remat else SSMBlock
    for i in range(cfg.n_layers):
      x = block_cls(cfg, decode, deterministic, name=f"layer_{i}")(x, segment_ids_BxL)
    h = layers.RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(h)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    logits = logits.astype(jnp.float32)
    return (logits, h) if return_hidden else logits

  # Decoding adapters may compute a whole prompt's recurrent state with one call of ``prefill``.
  parallel_prefill = True

  def prefill(self, tokens_BxL, valid_BxL=None):
    """Advances the decoding cache over ``tokens_BxL`` in one associative scan. ``valid_BxL``
    marks each row's real tokens (a prefix of the row); states and convolution caches stop at
    a row's last real token."""
    seg = None if valid_BxL is None else valid_BxL.astype(jnp.int32)
    self(tokens_BxL, segment_ids_BxL=seg, decode=True)


def init_cache(config: SSMConfig, batch_size: int, rng=None):
  """A zero decoding cache for ``batch_size`` rows, built from shapes only."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda r: SSMLM(config).init(r, tokens, decode=True), rng)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))
