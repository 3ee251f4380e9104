"""Transformers: a decoder-only LM (Llama family) and an encoder-decoder (T5 family).

One config expresses both families: RMSNorm or LayerNorm, RoPE / T5 relative bias / learned /
no positions, SwiGLU / GeGLU / GELU / ReLU MLPs, grouped-query attention, tied or untied
embeddings, causal or bidirectional self-attention (the diffusion backbone is bidirectional).

Call contract of the decoder-only LM (shared with ``models/ssm.py``)::

    logits_BxLxV = TransformerLM(cfg).apply({"params": p}, tokens_BxL, positions_BxL=None,
        segment_ids_BxL=None, decode=False, deterministic=True, return_hidden=False)

``segment_ids`` (packing): tokens attend only within their segment; segment 0 is padding.
``decode=True`` reads and writes the ``cache`` collection: ``tokens_BxL`` continues each row's
sequence at its own position; every cache leaf is batch-leading.

``scan_layers=True`` builds each stack as one ``nn.scan`` over a single block: parameters live
under ``<stack>/layers/...`` with a leading ``[num_layers]`` axis (logical name ``layers``)
instead of ``<stack>/layer_0``, ``layer_1``, ... The compiled program holds the block once, so
compile time stops growing with depth. Decoding works unchanged: the KV cache is stacked on
axis 1 (``cached_key [B, num_layers, G, max_len, K]``, still batch-leading) and all layers write
at the stack's ``position`` (no per-layer ``cache_index``). :func:`stack_layer_params` /
:func:`unstack_layer_params` convert parameter trees between the two layouts; code that walks
parameters by per-layer path (LoRA targets, optimizer ``freeze`` patterns naming ``layer_N``,
Hugging Face / GGUF import and export) expects the unscanned layout: unstack first.

Precision: ``dtype="bfloat16"`` with ``param_dtype="float32"`` runs the matmuls in bfloat16
from float32 parameters (Flax casts each kernel at use); norms, RoPE, the attention softmax and
the logits are float32 (attention logits and the vocabulary projection accumulate in float32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicjax.models import layers
from slicjax.models.layers import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of both transformer shapes.

  ``num_encoder_layers = 0`` gives a decoder-only LM; ``> 0`` an encoder-decoder.
  """

  vocab_size: int = 512
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512
  num_layers: int = 2
  num_encoder_layers: int = 0
  norm: str = "rms"
  norm_eps: float = 1e-6
  position: str = "rope"  # rope | relative | learned | none
  rope_theta: float = 10000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  mlp: str = "swiglu"
  tie_embeddings: bool = True
  tied_logit_scale: bool = False  # T5: logits scaled by d_model**-0.5 when tied
  scale_queries: bool = True  # T5 folds 1/sqrt(head_dim) into its init instead
  use_bias: bool = False
  qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
  causal: bool = True
  max_len: int = 256
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False  # rematerialize each block in the backward pass (activation memory)
  scan_layers: bool = False  # one nn.scan over the layer stack (see the module docstring)
  # Decoding attends over the smallest of cache_bucket, 2 * cache_bucket, ... slots that holds
  # the filled cache, not the whole max_len buffer; 0 = always the whole buffer.
  cache_bucket: int = 64
  decoder_start_id: int = 2  # BOS; T5 checkpoints use 0

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
    d = dict(d)
    d.pop("family", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(
        f"unknown transformer config key(s) {unknown}; valid keys are {sorted(known)}."
      )
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
      )
    if self.position not in ("rope", "relative", "learned", "none"):
      raise ValueError(f"position={self.position!r}; use rope, relative, learned or none.")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")
    layers.dtype_of(self.dtype), layers.dtype_of(self.param_dtype)
    if self.scan_layers and self.num_layers < 1:
      raise ValueError(
        f"scan_layers=True needs num_layers >= 1 (got {self.num_layers}); set scan_layers=False "
        "for a model without decoder layers."
      )

  @property
  def is_encoder_decoder(self) -> bool:
    return self.num_encoder_layers > 0


class Block(nn.Module):
  """Pre-norm block: self-attention, optional cross-attention, MLP."""

  cfg: TransformerConfig
  causal: bool
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  scanned: bool = False  # the body of nn.scan: returns ``(x, None)`` (carry, no stacked output)

  @nn.compact
  def __call__(
    self, x, self_mask, self_bias, q_pos, encoded=None, cross_mask=None, cache_index_B=None
  ):
    cfg = self.cfg
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)

    def attn(name, decode):
      return layers.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dt,
        param_dtype=pdt, use_rope=(cfg.position == "rope" and name == "self_attention"),
        rope_theta=cfg.rope_theta, scale_queries=cfg.scale_queries, use_bias=cfg.use_bias,
        qkv_bias=cfg.qkv_bias, dropout_rate=cfg.dropout_rate, max_len=cfg.max_len,
        cache_bucket=cfg.cache_bucket, name=name,
      )

    def dropout(y):
      if cfg.dropout_rate > 0 and not self.deterministic:
        return nn.Dropout(cfg.dropout_rate)(y, deterministic=False)
      return y

    h = layers.make_norm(cfg.norm, cfg.norm_eps, dt, pdt, "pre_attention_norm")(x)
    h = attn("self_attention", self.decode)(
      h, h, self_mask, self_bias, q_pos, q_pos, decode=self.decode,
      deterministic=self.deterministic, cache_index_B=cache_index_B,
    )
    x = x + dropout(h)
    if self.cross:
      h = layers.make_norm(cfg.norm, cfg.norm_eps, dt, pdt, "pre_cross_attention_norm")(x)
      h = attn("cross_attention", False)(h, encoded, cross_mask, deterministic=self.deterministic)
      x = x + dropout(h)
    h = layers.make_norm(cfg.norm, cfg.norm_eps, dt, pdt, "pre_mlp_norm")(x)
    h = layers.MLP(
      cfg.d_ff, cfg.mlp, dtype=dt, param_dtype=pdt, use_bias=cfg.use_bias,
      dropout_rate=cfg.dropout_rate, name="mlp",
    )(h, deterministic=self.deterministic)
    x = x + dropout(h)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, None) if self.scanned else x


def _segment_mask(q_seg_BxQ, k_seg_BxK):
  return (q_seg_BxQ[:, :, None] == k_seg_BxK[:, None, :]) & (k_seg_BxK[:, None, :] != 0)


def _chunk_decode_mask(chunk_mask_BxQxQ, start_B, max_len):
  """Decode-mode self-attention mask ``[B, Q, max_len]`` of a chunk of Q tokens written at slots
  ``start_B .. start_B + Q - 1``: every slot before ``start_B`` (the cache) is visible, slots of
  the chunk follow ``chunk_mask_BxQxQ``, later slots are hidden."""
  b, q = chunk_mask_BxQxQ.shape[0], chunk_mask_BxQxQ.shape[1]
  if chunk_mask_BxQxQ.shape != (b, q, q) or start_B.shape != (b,):
    raise ValueError(
      f"decode attention_mask_BxLxL has shape {chunk_mask_BxQxQ.shape}; expected [B, L, L] for "
      f"the L tokens of the call with B = {start_B.shape[0]} cache rows."
    )
  slots = jnp.arange(max_len)
  rel_BxS = slots[None, :] - start_B[:, None]  # slot index inside the chunk
  in_chunk = (rel_BxS >= 0) & (rel_BxS < q)
  chunk = jnp.take_along_axis(
    chunk_mask_BxQxQ.astype(bool), jnp.broadcast_to(jnp.clip(rel_BxS, 0, q - 1)[:, None, :],
                                                    (b, q, max_len)), axis=2,
  )
  return jnp.where(in_chunk[:, None, :], chunk, (rel_BxS < 0)[:, None, :])


def cross_attention_mask(decoder_segment_ids_BxL, encoder_segment_ids_BxS, *, decode: bool):
  """``[B, L, S]`` cross-attention mask. Training: decoder segment k reads encoder segment k
  (packing) and never padding; decoding (one continuing sequence per row): every non-padding
  encoder position."""
  if decode:
    b, length = decoder_segment_ids_BxL.shape
    return jnp.broadcast_to((encoder_segment_ids_BxS != 0)[:, None, :],
                            (b, length, encoder_segment_ids_BxS.shape[1]))
  return _segment_mask(decoder_segment_ids_BxL, encoder_segment_ids_BxS)


class Stack(nn.Module):
  """A stack of blocks with its position handling and final norm (encoder or decoder)."""

  cfg: TransformerConfig
  causal: bool
  cross: bool
  embed: nn.Module
  num_layers: int

  @nn.compact
  def __call__(
    self, tokens_BxL, positions_BxL, segment_ids_BxL, encoded=None, cross_mask=None, *,
    decode=False, deterministic=True, attention_mask_BxLxL=None,
  ):
    """``attention_mask_BxLxL`` (optional, boolean): which tokens of this call each token of this
    call attends to, replacing the causal rule; training mode still ANDs the segment mask.
    In decode mode every cached slot before the call's first position stays visible, so a chunk
    of L tokens can run block-causally or bidirectionally against a KV cache."""
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if not decode and length > cfg.max_len:
      raise ValueError(
        f"sequence length {length} exceeds the model maximum max_len={cfg.max_len}; truncate "
        f"the data (pipeline max lengths) or raise max_len in the model config."
      )
    x = self.embed(tokens_BxL)
    if decode:
      is_init = not self.has_variable("cache", "position")
      pos_var = self.variable("cache", "position", jnp.zeros, (b,), jnp.int32)
      start_B = pos_var.value
      if not is_init:
        pos_var.value = start_B + length
      q_pos = start_B[:, None] + jnp.arange(length)[None, :]
      slots = jnp.arange(cfg.max_len)
      self_mask = slots[None, None, :] <= q_pos[:, :, None]
      if attention_mask_BxLxL is not None:
        self_mask = _chunk_decode_mask(attention_mask_BxLxL, start_B, cfg.max_len)
      k_pos = jnp.broadcast_to(slots[None, :], (b, cfg.max_len))
    else:
      q_pos = positions_BxL
      k_pos = positions_BxL
      self_mask = _segment_mask(segment_ids_BxL, segment_ids_BxL)
      if attention_mask_BxLxL is not None:
        if attention_mask_BxLxL.shape != (b, length, length):
          raise ValueError(
            f"attention_mask_BxLxL has shape {attention_mask_BxLxL.shape}, expected "
            f"{(b, length, length)} (one [L, L] boolean mask per row of tokens)."
          )
        self_mask = self_mask & attention_mask_BxLxL.astype(bool)
      elif self.causal:
        idx = jnp.arange(length)
        self_mask = self_mask & (idx[None, None, :] <= idx[None, :, None])
    if cfg.position == "learned":
      pos_table = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
        (cfg.max_len, cfg.d_model), layers.dtype_of(cfg.param_dtype),
      )
      x = x + jnp.take(pos_table, q_pos, axis=0).astype(x.dtype)
    bias = None
    if cfg.position == "relative":
      bias = layers.RelativePositionBias(
        cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
        bidirectional=not self.causal, param_dtype=layers.dtype_of(cfg.param_dtype),
        name="relative_bias",
      )(q_pos, k_pos)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    if cfg.scan_layers:
      # One block traced once and run num_layers times: params (and the decode cache) gain a
      # layer axis; every other input is the same for all layers (broadcast). The cache keeps
      # batch first (layer axis 1) and the layers write at the stack's position, start_B.
      # Decoding unrolls the loop: a rolled scan over the cache (transposed to layer-first,
      # sliced, restacked every step) took 3.6x the unrolled stack's greedy decode time on CPU,
      # unrolled 1.5-2.1x (d_model 128, 8 layers); training, the point of scanning, stays rolled.
      block_cls = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
      scanned = nn.scan(
        block_cls, variable_axes={"params": 0, "cache": 1},
        split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 6,
        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=self.num_layers if decode else 1,
      )
      x, _ = scanned(
        cfg, self.causal, self.cross, decode, deterministic, scanned=True, name="layers"
      )(x, self_mask, bias, q_pos, encoded, cross_mask, start_B if decode else None)
    else:
      block_cls = nn.remat(Block) if cfg.remat else Block
      for i in range(self.num_layers):
        x = block_cls(cfg, self.causal, self.cross, decode, deterministic, name=f"layer_{i}")(
          x, self_mask, bias, q_pos, encoded, cross_mask
        )
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    return layers.make_norm(cfg.norm, cfg.norm_eps, dt, pdt, "final_norm")(x)


_LAYER_PREFIX = "layer_"
_SCANNED_KEY = "layers"


def _is_layer_key(k) -> bool:
  return isinstance(k, str) and k.startswith(_LAYER_PREFIX) and k[len(_LAYER_PREFIX):].isdigit()


def stack_layer_params(params):
  """Unscanned -> scanned parameter layout (``scan_layers=True``).

  Every mapping in ``params`` (unboxed: ``nn.unbox`` first) holding ``layer_0 .. layer_{n-1}``
  has them replaced by one ``layers`` subtree whose leaves are the per-layer leaves stacked on a
  new leading axis. Anything else (embeddings, final norm, relative bias, head) is unchanged.
  Works on a whole ``{"params": ...}`` variables dict or on the params alone.

  Raises:
    ValueError: if a stack's layer indices are not ``0 .. n-1`` or the layers differ in
      structure or shapes.
  """
  if not isinstance(params, Mapping):
    return params
  keys = [k for k in params if _is_layer_key(k)]
  out = {k: stack_layer_params(v) for k, v in params.items() if k not in keys}
  if keys:
    idx = sorted(int(k[len(_LAYER_PREFIX):]) for k in keys)
    if idx != list(range(len(idx))):
      raise ValueError(f"layer keys {sorted(keys)} are not layer_0 .. layer_{len(idx) - 1}.")
    if _SCANNED_KEY in out:
      raise ValueError(f"params hold both {_SCANNED_KEY!r} and layer_N keys: already stacked?")
    trees = [params[f"{_LAYER_PREFIX}{i}"] for i in idx]
    ref = jax.tree.structure(trees[0])
    for i, t in enumerate(trees):
      if jax.tree.structure(t) != ref or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(trees[0]))
      ):
        raise ValueError(f"layer_{i} differs in structure or shapes from layer_0: cannot stack.")
    out[_SCANNED_KEY] = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return out


def unstack_layer_params(params):
  """Scanned -> unscanned parameter layout: the inverse of :func:`stack_layer_params` (each
  ``layers`` subtree with leading axis ``n`` becomes ``layer_0 .. layer_{n-1}``). Use it before
  LoRA, optimizer ``freeze`` patterns over ``layer_N`` paths, or Hugging Face / GGUF export."""
  if not isinstance(params, Mapping):
    return params
  out = {k: unstack_layer_params(v) for k, v in params.items() if k != _SCANNED_KEY}
  if _SCANNED_KEY in params:
    stacked = params[_SCANNED_KEY]
    n = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(n) != 1:
      raise ValueError(f"'{_SCANNED_KEY}' leaves disagree on the layer count: {sorted(n)}.")
    for i in range(n.pop()):
      out[f"{_LAYER_PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def _default_positions(segment_ids_BxL):
  """Positions restarting at 0 in each segment (plain 0..L-1 without packing)."""
  seg = segment_ids_BxL
  length = seg.shape[1]
  idx = jnp.broadcast_to(jnp.arange(length)[None, :], seg.shape)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


class _OutputHead(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, h, embed: layers.Embed):
    cfg = self.cfg
    # The projection runs on [tokens, D] rows: with [B, L, D] XLA:CPU picked transposed layouts
    # for the backward (the vocabulary-gradient matmul and the softmax gradient written
    # [V, tokens]), which made the head's forward + backward 2.2x slower (268 vs 119 ms for
    # 8 x 128 tokens, D 256, V 8192, one core).
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    if cfg.tie_embeddings:
      if cfg.tied_logit_scale:
        h = h * (cfg.d_model**-0.5)
      logits = embed.attend(h)
    else:
      logits = nn.Dense(
        cfg.vocab_size, use_bias=False, dtype=layers.dtype_of(cfg.dtype),
        param_dtype=layers.dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "normal"), ("embed", "vocab")
        ),
        # bf16 compute: accumulate and return float32 logits (as Embed.attend does when tied)
        dot_general=functools.partial(
          jax.lax.dot_general, preferred_element_type=layers.accum_dtype(layers.dtype_of(cfg.dtype))
        ),
        name="lm_head",
      )(h)
    logits = logits.reshape(*lead, logits.shape[-1])
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)


class TransformerLM(nn.Module):
  """Decoder-only transformer LM (causal unless ``cfg.causal`` is False)."""

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    if cfg.is_encoder_decoder:
      raise ValueError("TransformerLM is decoder-only: set num_encoder_layers=0.")
    self.embed = layers.Embed(
      cfg.vocab_size, cfg.d_model, layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype),
      name="token_embed",
    )
    self.head = _OutputHead(cfg, name="head")
    self.decoder = Stack(cfg, cfg.causal, False, self.embed, cfg.num_layers)

  def __call__(
    self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, decode=False, deterministic=True,
    return_hidden=False, attention_mask_BxLxL=None,
  ):
    h = self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL, decode=decode,
                           deterministic=deterministic, attention_mask_BxLxL=attention_mask_BxLxL)
    logits = self.head(h, self.embed)
    return (logits, h) if return_hidden else logits

  def hidden_states(
    self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, decode=False, deterministic=True,
    attention_mask_BxLxL=None,
  ):
    """The decoder's final states ``[B, L, D]``, before the vocabulary projection.

    ``attention_mask_BxLxL``: an explicit boolean self-attention mask replacing the causal /
    bidirectional rule (block-causal diffusion); see :class:`Stack`."""
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
    if positions_BxL is None:
      positions_BxL = _default_positions(segment_ids_BxL)
    return self.decoder(
      tokens_BxL, positions_BxL, segment_ids_BxL, decode=decode, deterministic=deterministic,
      attention_mask_BxLxL=attention_mask_BxLxL,
    )

  def logits_from_hidden(self, h_BxLxD):
    """Vocabulary logits (float32) of decoder states: lets callers project only the positions
    they score (a prefix LM's targets), not the whole sequence."""
    return self.head(h_BxLxD, self.embed)

  # Decoding adapters may write a whole prompt's KV cache with one call of ``prefill``.
  parallel_prefill = True

  def prefill(self, tokens_BxL, valid_BxL=None):
    """Writes the KV cache of ``tokens_BxL`` in one pass (decode mode), computing no logits.

    Every row advances by ``L`` slots (``valid_BxL`` is not needed): a caller with ragged
    prompts resets each row's ``position`` / ``cache_index`` to its own length afterwards (slots
    past it are masked until decoding overwrites them)."""
    del valid_BxL
    seg = jnp.ones(tokens_BxL.shape, jnp.int32)
    self.decoder(tokens_BxL, _default_positions(seg), seg, decode=True)


def encode_then_decode(
  module, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids, inputs_positions,
  decoder_segment_ids, decoder_positions, deterministic, return_hidden,
):
  """The teacher-forced ``__call__`` shared by every encoder-decoder with the
  ``encode`` / ``decode`` contract of :class:`EncoderDecoderTransformer`."""
  if inputs_segment_ids is None:
    inputs_segment_ids = (inputs_BxS != 0).astype(jnp.int32)
  encoded = module.encode(inputs_BxS, inputs_segment_ids, inputs_positions, deterministic)
  return module.decode(
    encoded, inputs_segment_ids, decoder_tokens_BxL, decoder_positions, decoder_segment_ids,
    decode=False, deterministic=deterministic, return_hidden=return_hidden,
  )


class EncoderDecoderTransformer(nn.Module):
  """T5-style encoder-decoder with shared token embeddings."""

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    if not cfg.is_encoder_decoder:
      raise ValueError("EncoderDecoderTransformer needs num_encoder_layers > 0.")
    self.embed = layers.Embed(
      cfg.vocab_size, cfg.d_model, layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype),
      name="token_embed",
    )
    self.head = _OutputHead(cfg, name="head")
    self.encoder = Stack(cfg, False, False, self.embed, cfg.num_encoder_layers)
    self.decoder = Stack(cfg, True, True, self.embed, cfg.num_layers)

  def encode(self, inputs_BxS, segment_ids_BxS=None, positions_BxS=None, deterministic=True):
    if segment_ids_BxS is None:
      segment_ids_BxS = (inputs_BxS != 0).astype(jnp.int32)
    if positions_BxS is None:
      positions_BxS = _default_positions(segment_ids_BxS)
    return self.encoder(
      inputs_BxS, positions_BxS, segment_ids_BxS, decode=False, deterministic=deterministic
    )

  def decode(
    self, encoded_BxSxD, encoder_segment_ids_BxS, tokens_BxL, positions_BxL=None,
    segment_ids_BxL=None, decode=False, deterministic=True, return_hidden=False,
  ):
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
    if positions_BxL is None:
      positions_BxL = _default_positions(segment_ids_BxL)
    cross_mask = cross_attention_mask(segment_ids_BxL, encoder_segment_ids_BxS, decode=decode)
    h = self.decoder(
      tokens_BxL, positions_BxL, segment_ids_BxL, encoded_BxSxD, cross_mask, decode=decode,
      deterministic=deterministic,
    )
    logits = self.head(h, self.embed)
    return (logits, h) if return_hidden else logits

  def __call__(
    self, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids=None, inputs_positions=None,
    decoder_segment_ids=None, decoder_positions=None, deterministic=True, return_hidden=False,
  ):
    return encode_then_decode(
      self, inputs_BxS, decoder_tokens_BxL, inputs_segment_ids, inputs_positions,
      decoder_segment_ids, decoder_positions, deterministic, return_hidden,
    )
