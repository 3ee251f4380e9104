"""Encoder-decoder with a state-space decoder: transformer encoder, SSM blocks + cross-attention.

Call contract (the same as :class:`~slicjax.models.transformer.EncoderDecoderTransformer`, so
:class:`~slicjax.models.seq_model.EncoderDecoder` wraps it unchanged)::

    encoded_BxSxD = m.apply(v, inputs_BxS, segment_ids_BxS=None, positions_BxS=None,
        deterministic=True, method=m.encode)
    logits_BxLxV = m.apply(v, encoded_BxSxD, encoder_segment_ids_BxS, tokens_BxL,
        positions_BxL=None, segment_ids_BxL=None, decode=False, deterministic=True,
        return_hidden=False, method=m.decode)
    logits_BxLxV = m.apply(v, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids=None,
        inputs_positions=None, decoder_segment_ids=None, decoder_positions=None,
        deterministic=True, return_hidden=False)

* ``return_hidden=True`` returns ``(logits_BxLxV, hidden_BxLxD)`` (the decoder's final-norm
  states); logits are float32.
* Encoder: the library's bidirectional transformer stack (:class:`transformer.Stack`, RMSNorm,
  ``encoder_position`` positions, ``encoder_mlp`` MLPs) over the shared token embedding.
  ``segment_ids_BxS`` defaults to ``inputs != 0``: padding (segment 0) is never attended to, by
  the encoder or by cross-attention.
* Decoder: ``n_layers`` layers, each an :class:`~slicjax.models.ssm.SSMBlock` (``variant`` S4D /
  S5 / selective, exactly as in :class:`~slicjax.models.ssm.SSMLM`) followed by a pre-RMSNorm
  cross-attention sublayer (:class:`layers.Attention`) over the encoder output with a residual
  connection; then the final RMSNorm and the (tied or untied) output head.
* ``positions_BxL`` of the decoder is accepted and ignored (the recurrence encodes order);
  ``segment_ids_BxL`` (packed targets; 0 is padding) resets every SSM state where a new segment
  starts, and decoder segment ``k`` cross-attends only to encoder segment ``k``.
* ``decode=True`` (``tokens_BxL`` continues each row's sequence; ``L = 1`` is one O(1) recurrent
  step): apply with ``{"params": p, "cache": c}`` and ``mutable=["cache"]``. The cache holds only
  the SSM and short-convolution states (size independent of length, batch-leading leaves);
  ``encoded_BxSxD`` is passed in at every step and cross-attention reads it directly (no cache).
  In decode mode ``segment_ids_BxL`` is ignored (each row is one continuing sequence).

Built by ``factory.build_model`` for ``family="ssm"`` with ``num_encoder_layers > 0``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from slicjax.models import layers, ssm, transformer
from slicjax.models.layers import constrain

ENCODER_POSITIONS = ("relative", "rope", "learned", "none")
ENCODER_MLPS = ("swiglu", "geglu", "gelu", "relu")
_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")
_MAX_LEARNED_LEN = 1 << 16


@dataclasses.dataclass(frozen=True)
class SSMEncDecConfig(ssm.SSMConfig):
  """Hyperparameters of :class:`SSMEncoderDecoder`: every :class:`~slicjax.models.ssm.SSMConfig`
  field (they describe the decoder; ``d_model``, ``vocab_size``, ``dtype``, ``dropout``,
  ``norm_eps`` and ``remat`` are shared with the encoder) plus the encoder's.

  Attributes:
    num_encoder_layers: transformer encoder layers (>= 1). In ``factory.build_model`` (family
      ``"ssm"``) a value > 0 selects this encoder-decoder; 0 (the default there) the decoder-only
      :class:`~slicjax.models.ssm.SSMLM`.
    num_heads: attention heads of the encoder and of every decoder cross-attention.
    num_kv_heads: key/value heads (grouped-query attention); 0 means ``num_heads``.
    head_dim: per-head width; 0 means ``d_model // num_heads``.
    d_ff: hidden width of the encoder MLPs; 0 means ``4 * d_model``.
    encoder_position: encoder positions, ``"relative"`` (T5 bias) | ``"rope"`` | ``"learned"``
      (needs a ``max_len`` of at most 65536) | ``"none"``.
    encoder_mlp: ``"swiglu"`` | ``"geglu"`` | ``"gelu"`` | ``"relu"``.
    relative_buckets, relative_max_distance: T5 relative-position buckets of the encoder.
    max_len: the longest input and the longest target the adapter accepts (the SSM decoder
      itself has no limit).
    decoder_start_id: the token the decoder starts from (BOS).
  """

  num_encoder_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  d_ff: int = 0
  encoder_position: str = "relative"
  encoder_mlp: str = "swiglu"
  relative_buckets: int = 32
  relative_max_distance: int = 128
  max_len: int = 1 << 30
  decoder_start_id: int = 2

  def __post_init__(self):
    super().__post_init__()
    if int(self.num_encoder_layers) < 1:
      raise ValueError(
        f"num_encoder_layers={self.num_encoder_layers} must be >= 1 for the SSM encoder-decoder; "
        "for a decoder-only SSM use family='ssm' without num_encoder_layers (or 0)."
      )
    if int(self.num_heads) < 1:
      raise ValueError(f"num_heads={self.num_heads} must be a positive integer.")
    for name in ("num_kv_heads", "head_dim", "d_ff"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 picks the default).")
    if self.num_heads % self.enc_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}; "
        "change either (0 uses num_kv_heads = num_heads)."
      )
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(
        f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim "
        "explicitly or pick num_heads dividing d_model."
      )
    if self.encoder_position not in ENCODER_POSITIONS:
      raise ValueError(
        f"unknown encoder_position {self.encoder_position!r}; use one of {ENCODER_POSITIONS}."
      )
    if self.encoder_position == "rope" and self.enc_head_dim % 2:
      raise ValueError(
        f"encoder_position='rope' needs an even head_dim, got {self.enc_head_dim}; change "
        "head_dim (or d_model / num_heads) or use encoder_position='relative'."
      )
    if self.encoder_mlp not in ENCODER_MLPS:
      raise ValueError(f"unknown encoder_mlp {self.encoder_mlp!r}; use one of {ENCODER_MLPS}.")
    if int(self.max_len) < 1:
      raise ValueError(f"max_len={self.max_len} must be a positive integer.")
    if self.encoder_position == "learned" and self.max_len > _MAX_LEARNED_LEN:
      raise ValueError(
        f"encoder_position='learned' stores a [max_len, d_model] table but max_len="
        f"{self.max_len}; set max_len (e.g. 512, at most {_MAX_LEARNED_LEN}) or use "
        "encoder_position='relative'."
      )
    if self.relative_buckets < 2 or self.relative_max_distance < 1:
      raise ValueError("relative_buckets must be >= 2 and relative_max_distance >= 1.")
    if not 0 <= self.decoder_start_id < self.vocab_size:
      raise ValueError(
        f"decoder_start_id={self.decoder_start_id} must be a token id in [0, vocab_size="
        f"{self.vocab_size})."
      )

  @property
  def enc_kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def enc_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def encoder_config(self) -> transformer.TransformerConfig:
    """The :class:`~slicjax.models.transformer.TransformerConfig` of the encoder stack."""
    return transformer.TransformerConfig(
      vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads,
      num_kv_heads=self.enc_kv_heads, head_dim=self.enc_head_dim,
      d_ff=self.d_ff or 4 * self.d_model, num_layers=self.num_encoder_layers,
      num_encoder_layers=self.num_encoder_layers, norm="rms", norm_eps=self.norm_eps,
      position=self.encoder_position, relative_buckets=self.relative_buckets,
      relative_max_distance=self.relative_max_distance, mlp=self.encoder_mlp, causal=False,
      max_len=self.max_len, dropout_rate=self.dropout, dtype=self.dtype,
      param_dtype=self.param_dtype, remat=self.remat, decoder_start_id=self.decoder_start_id,
    )


class SSMCrossBlock(nn.Module):
  """One decoder layer: an :class:`~slicjax.models.ssm.SSMBlock`, then pre-norm cross-attention
  over the encoder output with a residual connection."""

  cfg: SSMEncDecConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, encoded_BxSxD, cross_mask_BxLxS):
    cfg = self.cfg
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    x = ssm.SSMBlock(cfg, self.decode, self.deterministic, name="ssm_block")(
      x_BxLxD, segment_ids_BxL
    )
    h = layers.RMSNorm(cfg.norm_eps, dt, pdt, name="pre_cross_attention_norm")(x)
    h = layers.Attention(
      num_heads=cfg.num_heads, num_kv_heads=cfg.enc_kv_heads, head_dim=cfg.enc_head_dim,
      dtype=dt, param_dtype=pdt, dropout_rate=cfg.dropout, name="cross_attention",
    )(h, encoded_BxSxD, cross_mask_BxLxS, deterministic=self.deterministic)
    if cfg.dropout > 0 and not self.deterministic:
      h = nn.Dropout(cfg.dropout)(h, deterministic=False)
    return constrain(x + h.astype(x.dtype), _EMBED_AXES)


class SSMCrossDecoder(nn.Module):
  """Embedding, ``n_layers`` :class:`SSMCrossBlock` layers, final norm and output head."""

  cfg: SSMEncDecConfig
  embed: nn.Module

  @nn.compact
  def __call__(
    self, tokens_BxL, segment_ids_BxL, encoded_BxSxD, cross_mask_BxLxS, *, decode=False,
    deterministic=True,
  ):
    cfg = self.cfg
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    x = constrain(self.embed(tokens_BxL), _EMBED_AXES)
    if cfg.dropout > 0 and not deterministic:
      x = nn.Dropout(cfg.dropout)(x, deterministic=False)
    block_cls = nn.remat(SSMCrossBlock) if cfg.remat else SSMCrossBlock
    for i in range(cfg.n_layers):
      x = block_cls(cfg, decode, deterministic, name=f"layer_{i}")(
        x, segment_ids_BxL, encoded_BxSxD, cross_mask_BxLxS
      )
    h = layers.RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = ssm._dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(h)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32), h


class SSMEncoderDecoder(nn.Module):
  """Transformer encoder + SSM decoder with cross-attention (see the module docstring)."""

  config: SSMEncDecConfig

  def setup(self):
    cfg = self.config
    self.embed = layers.Embed(
      cfg.vocab_size, cfg.d_model, layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype),
      name="token_embed",
    )
    self.encoder = transformer.Stack(
      cfg.encoder_config, False, False, self.embed, cfg.num_encoder_layers
    )
    self.decoder = SSMCrossDecoder(cfg, self.embed)

  def encode(self, inputs_BxS, segment_ids_BxS=None, positions_BxS=None, deterministic=True):
    _check_tokens(inputs_BxS, segment_ids_BxS, "inputs")
    if segment_ids_BxS is None:
      segment_ids_BxS = (inputs_BxS != 0).astype(jnp.int32)
    if positions_BxS is None:
      positions_BxS = transformer._default_positions(segment_ids_BxS)
    return self.encoder(
      inputs_BxS, positions_BxS, segment_ids_BxS, decode=False, deterministic=deterministic
    )

  def decode(
    self, encoded_BxSxD, encoder_segment_ids_BxS, tokens_BxL, positions_BxL=None,
    segment_ids_BxL=None, decode=False, deterministic=True, return_hidden=False,
  ):
    del positions_BxL  # order is carried by the recurrence
    _check_tokens(tokens_BxL, segment_ids_BxL, "decoder tokens")
    b = tokens_BxL.shape[0]
    if encoded_BxSxD.shape[0] != b or encoder_segment_ids_BxS.shape != encoded_BxSxD.shape[:2]:
      raise ValueError(
        f"encoded {encoded_BxSxD.shape} and encoder_segment_ids {encoder_segment_ids_BxS.shape} "
        f"must be [B, S, D] and [B, S] with B = {b}, the decoder tokens' batch."
      )
    if decode:
      segment_ids_BxL = None  # each row is one continuing sequence
    q_seg = jnp.ones(tokens_BxL.shape, jnp.int32) if segment_ids_BxL is None else segment_ids_BxL
    cross_mask = transformer.cross_attention_mask(q_seg, encoder_segment_ids_BxS, decode=decode)
    logits, h = self.decoder(
      tokens_BxL, segment_ids_BxL, encoded_BxSxD, cross_mask, decode=decode,
      deterministic=deterministic,
    )
    return (logits, h) if return_hidden else logits

  def __call__(
    self, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids=None, inputs_positions=None,
    decoder_segment_ids=None, decoder_positions=None, deterministic=True, return_hidden=False,
  ):
    return transformer.encode_then_decode(
      self, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids, inputs_positions,
      decoder_segment_ids, decoder_positions, deterministic, return_hidden,
    )


def _check_tokens(tokens, segment_ids, what: str):
  if tokens.ndim != 2:
    raise ValueError(f"{what} must be [B, L] integers, got shape {tokens.shape}; add a batch axis.")
  if segment_ids is not None and segment_ids.shape != tokens.shape:
    raise ValueError(
      f"{what} segment_ids shape {segment_ids.shape} must equal the {what} shape {tokens.shape}."
    )
