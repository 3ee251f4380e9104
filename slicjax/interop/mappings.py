"""Tensor-name and layout mappings between slicjax transformers and Hugging Face checkpoints.

Families (config translation lives in ``hf_config.py``): ``llama`` (Llama, Mistral, Qwen2)
<-> :class:`~slicjax.models.transformer.TransformerLM`; ``t5`` <->
:class:`~slicjax.models.transformer.EncoderDecoderTransformer`.

A :class:`TensorMap` says where one slicjax parameter lives in the checkpoint and how its layout
differs: Hugging Face stores ``torch.nn.Linear`` weights as ``[out, in]`` with the heads merged,
slicjax stores ``[in, out]`` kernels with the heads split (query ``[D, H, K]``, output
``[H, K, D]``). :func:`read_block` reads any rectangular block of a slicjax parameter straight
from the checkpoint, which is what sharded loading needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from slicjax.models.transformer import TransformerConfig

# How a Hugging Face tensor becomes a slicjax parameter (see TensorMap.kind).
KINDS = ("copy", "transpose", "split_out", "split_in", "split_bias")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Where one slicjax parameter is stored in a Hugging Face checkpoint.

  Attributes:
    path: the parameter's path in the slicjax ``params`` tree.
    hf_name: the tensor's name in the safetensors files.
    kind: ``copy`` (same layout), ``transpose`` (``[out, in]`` -> ``[in, out]``), ``split_out``
      (``[H*K, D]`` -> ``[D, H, K]``: query/key/value), ``split_in`` (``[D, H*K]`` ->
      ``[H, K, D]``: attention output), ``split_bias`` (``[H*K]`` -> ``[H, K]``).
    scale: multiplies the tensor on import (folds an output scale into an untied head).
  """

  path: tuple[str, ...]
  hf_name: str
  kind: str
  scale: float = 1.0

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of a parameter whose slicjax shape is ``shape``."""
    if self.kind == "copy":
      return tuple(shape)
    if self.kind == "transpose":
      return tuple(shape[::-1])
    if self.kind == "split_out":
      d, h, k = shape
      return (h * k, d)
    if self.kind == "split_in":
      h, k, d = shape
      return (d, h * k)
    if self.kind == "split_bias":
      h, k = shape
      return (h * k,)
    raise ValueError(f"unknown tensor kind {self.kind!r}; use one of {KINDS}.")

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """slicjax layout -> checkpoint layout (no scale; export folds scales itself)."""
    if self.kind == "copy":
      return x
    if self.kind == "transpose":
      return np.ascontiguousarray(x.T)
    if self.kind == "split_out":
      d, h, k = x.shape
      return np.ascontiguousarray(x.reshape(d, h * k).T)
    if self.kind == "split_in":
      h, k, d = x.shape
      return np.ascontiguousarray(x.reshape(h * k, d).T)
    if self.kind == "split_bias":
      return x.reshape(-1)
    raise ValueError(f"unknown tensor kind {self.kind!r}; use one of {KINDS}.")


def _bounds(index, shape) -> list[tuple[int, int]]:
  """``(start, stop)`` per axis of a block index (a tuple of unit-step slices, or None: all)."""
  if index is None:
    index = ()
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    if step != 1:
      raise ValueError(f"block index {index} has a step; only contiguous blocks can be read.")
    out.append((start, stop))
  return out


def read_block(
  tmap: TensorMap, shape, read_hf: Callable[[tuple[slice, ...]], np.ndarray], index=None
):
  """Reads block ``index`` of the slicjax parameter ``tmap.path`` (full shape ``shape``).

  Args:
    tmap: the parameter's mapping.
    shape: the parameter's full slicjax shape.
    read_hf: reads a block of the checkpoint tensor given one slice per checkpoint axis.
    index: a tuple of slices into ``shape`` (what ``jax.make_array_from_callback`` passes), or
      ``None`` for the whole parameter.

  Returns:
    The block in slicjax layout, in the checkpoint's dtype (times ``tmap.scale``).
  """
  b = _bounds(index, shape)
  sl = [slice(s, e) for s, e in b]
  kind = tmap.kind
  if kind == "copy":
    out = read_hf(tuple(sl))
  elif kind == "transpose":
    out = read_hf(tuple(sl[::-1])).T
  elif kind in ("split_out", "split_in", "split_bias"):
    hax, kax = (1, 2) if kind == "split_out" else (0, 1)
    k = shape[kax]
    (h0, h1), (k0, k1) = b[hax], b[kax]
    merged = slice(h0 * k, h1 * k)  # whole heads; the head_dim block is cut after the read
    if kind == "split_out":
      part = read_hf((merged, sl[0])).T.reshape(b[0][1] - b[0][0], h1 - h0, k)
      out = part[:, :, k0:k1]
    elif kind == "split_in":
      part = read_hf((sl[2], merged)).T.reshape(h1 - h0, k, b[2][1] - b[2][0])
      out = part[:, k0:k1, :]
    else:
      out = read_hf((merged,)).reshape(h1 - h0, k)[:, k0:k1]
  else:
    raise ValueError(f"unknown tensor kind {kind!r}; use one of {KINDS}.")
  if tmap.scale != 1.0:
    out = (out.astype(np.float32) * np.float32(tmap.scale)).astype(out.dtype)
  return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------------------
# Tensor names
# ------------------------------------------------------------------------------------------------

_LLAMA_LAYER = {
  ("pre_attention_norm", "scale"): ("input_layernorm.weight", "copy"),
  ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
  ("self_attention", "query", "kernel"): ("self_attn.q_proj.weight", "split_out"),
  ("self_attention", "key", "kernel"): ("self_attn.k_proj.weight", "split_out"),
  ("self_attention", "value", "kernel"): ("self_attn.v_proj.weight", "split_out"),
  ("self_attention", "query", "bias"): ("self_attn.q_proj.bias", "split_bias"),
  ("self_attention", "key", "bias"): ("self_attn.k_proj.bias", "split_bias"),
  ("self_attention", "value", "bias"): ("self_attn.v_proj.bias", "split_bias"),
  ("self_attention", "out", "kernel"): ("self_attn.o_proj.weight", "split_in"),
  ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "transpose"),
  ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "transpose"),
  ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "transpose"),
}

_T5_ATTN = {"query": "q", "key": "k", "value": "v", "out": "o"}


def _layer_index(part: str) -> int:
  if not part.startswith("layer_"):
    raise KeyError(part)
  return int(part[len("layer_") :])


def _llama_name(path: tuple[str, ...]) -> tuple[str, str]:
  if path == ("token_embed", "embedding"):
    return "model.embed_tokens.weight", "copy"
  if path == ("decoder", "final_norm", "scale"):
    return "model.norm.weight", "copy"
  if path == ("head", "lm_head", "kernel"):
    return "lm_head.weight", "transpose"
  if path[0] == "decoder" and tuple(path[2:]) in _LLAMA_LAYER:
    name, kind = _LLAMA_LAYER[tuple(path[2:])]
    return f"model.layers.{_layer_index(path[1])}.{name}", kind
  raise KeyError(path)


def _t5_name(path: tuple[str, ...], gated: bool) -> tuple[str, str]:
  if path == ("token_embed", "embedding"):
    return "shared.weight", "copy"
  if path == ("head", "lm_head", "kernel"):
    return "lm_head.weight", "transpose"
  stack = path[0]
  if stack not in ("encoder", "decoder"):
    raise KeyError(path)
  if path[1:] == ("final_norm", "scale"):
    return f"{stack}.final_layer_norm.weight", "copy"
  if path[1:] == ("relative_bias", "rel_embedding"):
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "transpose"
  i = _layer_index(path[1])
  rest = tuple(path[2:])
  ff = 2 if stack == "decoder" else 1
  pre = f"{stack}.block.{i}.layer"
  if rest == ("pre_attention_norm", "scale"):
    return f"{pre}.0.layer_norm.weight", "copy"
  if rest == ("pre_cross_attention_norm", "scale") and stack == "decoder":
    return f"{pre}.1.layer_norm.weight", "copy"
  if rest == ("pre_mlp_norm", "scale"):
    return f"{pre}.{ff}.layer_norm.weight", "copy"
  if len(rest) == 3 and rest[0] in ("self_attention", "cross_attention") and rest[2] == "kernel":
    if rest[0] == "cross_attention" and stack != "decoder":
      raise KeyError(path)
    mod = "0.SelfAttention" if rest[0] == "self_attention" else "1.EncDecAttention"
    kind = "split_in" if rest[1] == "out" else "split_out"
    return f"{pre}.{mod}.{_T5_ATTN[rest[1]]}.weight", kind
  if len(rest) == 3 and rest[0] == "mlp" and rest[2] == "kernel":
    names = {"gate": "wi_0", "up": "wi_1", "down": "wo"} if gated else {"up": "wi", "down": "wo"}
    if rest[1] in names:
      return f"{pre}.{ff}.DenseReluDense.{names[rest[1]]}.weight", "transpose"
  raise KeyError(path)


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  """``{path: leaf}`` of a nested dict (leaves are anything that is not a dict)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def tensor_maps(family: str, cfg: TransformerConfig, paths, *, head_scale: float = 1.0):
  """One :class:`TensorMap` per slicjax parameter path (``paths``), in the same order.

  Raises:
    ValueError: if a parameter has no place in the family's checkpoint layout.
  """
  gated = cfg.mlp in ("geglu", "swiglu")
  maps = []
  for path in paths:
    path = tuple(path)
    try:
      name, kind = _llama_name(path) if family == "llama" else _t5_name(path, gated)
    except (KeyError, ValueError, IndexError):
      raise ValueError(
        f"slicjax parameter {'/'.join(path)} has no counterpart in a Hugging Face {family} "
        "checkpoint; this model config cannot be exported to that architecture."
      ) from None
    scale = head_scale if path == ("head", "lm_head", "kernel") else 1.0
    maps.append(TensorMap(path, name, kind, scale))
  return maps


# Tensors that some checkpoints carry and that hold nothing slicjax needs.
def ignorable(family: str, name: str, tied: bool) -> bool:
  if family == "t5":
    return name in (
      "encoder.embed_tokens.weight",  # copies of shared.weight in older checkpoints
      "decoder.embed_tokens.weight",
      "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",  # unused
    ) or (tied and name == "lm_head.weight")
  return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")
