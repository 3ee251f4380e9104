"""Loads llama.cpp GGUF files (Llama and Qwen2 architectures) into slicjax transformers.

::

    model, params = load_gguf_checkpoint("/models/SmolLM2-135M-Instruct.Q4_1.gguf", max_len=512)
    tokenizer = load_gguf_tokenizer("/models/SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file holds the architecture (metadata), the tokenizer (vocabulary, merges, special ids,
chat template) and the tensors, possibly quantized. :class:`GGUFSource` presents the tensors in
Hugging Face naming and layout as float32 numpy arrays, dequantized per tensor with the ``gguf``
library itself, so the Hugging Face import path
(:func:`~slicjax.interop.hf_import.load_from_source`) loads them unchanged. The model keeps the
file's own token ids.

llama.cpp's converter reorders the rows of each query and key head for its interleaved RoPE;
:class:`GGUFSource` undoes that, so the tensors equal the Hugging Face checkpoint's.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np

from slicjax import sharding
from slicjax.interop import hf_import
from slicjax.interop.hf_tokenizer import HFTokenizer
from slicjax.models.seq_model import SeqModel

# GGUF general.architecture -> (Hugging Face architecture, model_type).
ARCHITECTURES = {
  "llama": ("LlamaForCausalLM", "llama"),
  "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
# Architectures whose query/key rows llama.cpp permutes for its interleaved RoPE.
_PERMUTED_QK = ("llama",)

_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _gguf():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover
    raise ImportError("reading GGUF files needs the gguf package: pip install gguf.") from e
  return gguf


def hf_tensor_name(gguf_name: str) -> str:
  """The Hugging Face name of a llama.cpp tensor name (unknown names are returned unchanged)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.match(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  return gguf_name


_DEQUANTIZABLE: dict[Any, bool] = {}


def _dequantizable(gguf, qtype) -> bool:
  """Whether ``gguf.quants.dequantize`` handles ``qtype`` (probed once on one zero block)."""
  if qtype not in _DEQUANTIZABLE:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
      gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
      _DEQUANTIZABLE[qtype] = True
    except Exception:  # NotImplementedError for the types the library cannot unpack
      _DEQUANTIZABLE[qtype] = False
  return _DEQUANTIZABLE[qtype]


def _unpermute_rows(n: int, n_heads: int) -> np.ndarray:
  """``perm`` with ``hf_rows = gguf_rows[perm]`` for a query/key weight of ``n`` rows.

  llama.cpp stores each head's rows as interleaved pairs ``(x0, x1), (x2, x3), ...`` where the
  Hugging Face layout has the two rotated halves ``[x0 .. x(k/2-1)], [x(k/2) .. x(k-1)]``: the
  Hugging Face row ``s * k/2 + j`` of a head (half ``s``, pair ``j``) is GGUF row ``2 * j + s``.
  """
  k = n // n_heads
  half = np.arange(k // 2)
  within = np.concatenate([2 * half, 2 * half + 1])  # HF row -> GGUF row, inside one head
  return (np.arange(n_heads)[:, None] * k + within[None, :]).reshape(-1)


class GGUFSource:
  """The tensors of a GGUF file, in Hugging Face naming and layout, dequantized to float32.

  Same interface as :class:`~slicjax.interop.hf_import.SafetensorsSource`: ``names()``,
  ``shape(name)``, ``dtype(name)`` (the GGML type, e.g. ``"Q4_1"``), ``check_dtype(name)`` and
  ``read(name, index)``. Only the rows a block needs are dequantized.

  Args:
    path: a ``.gguf`` file.

  Attributes:
    path: the file.
    reader: the ``gguf.GGUFReader`` (metadata in ``reader.fields``).
    architecture: ``general.architecture`` (e.g. ``"llama"``).

  Raises:
    FileNotFoundError: when ``path`` is not a file.
    ValueError: when the file is truncated or not a GGUF file.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      found = ""
      if os.path.isdir(path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        found = f" It is a directory holding {ggufs}: pass one of them." if ggufs else ""
      raise FileNotFoundError(
        f"GGUF file {path} does not exist; pass the path of a local .gguf file (slicjax does not "
        f"download models).{found}"
      )
    self.path = path
    gguf = _gguf()
    try:
      self.reader = gguf.GGUFReader(path)
      self.architecture = self._metadata("general.architecture")
    except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
      raise ValueError(
        f"cannot read {path}: the file is truncated or not a GGUF file ({type(e).__name__}: "
        f"{e}); download it again."
      ) from e
    self._tensors = {hf_tensor_name(t.name): t for t in self.reader.tensors}
    # query/key tensors whose rows llama.cpp permuted -> (metadata key, its value: head count)
    self._perm_heads: dict[str, tuple[str, Any]] = {}
    if self.architecture in _PERMUTED_QK:
      key = f"{self.architecture}.attention.head_count"
      heads = self._metadata(key)
      kv_key = key + "_kv" if f"{key}_kv" in self.reader.fields else key
      kv_heads = self._metadata(kv_key)
      for name in self._tensors:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
          self._perm_heads[name] = (key, heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
          self._perm_heads[name] = (kv_key, kv_heads)
    self._last: tuple[str, Any, np.ndarray] | None = None

  def _metadata(self, key: str, default: Any = None) -> Any:
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def metadata(self, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (e.g. ``"llama.context_length"``), or ``default``."""
    return self._metadata(key, default)

  def names(self) -> set[str]:
    return set(self._tensors)

  def gguf_name(self, name: str) -> str:
    return self._tensors[name].name

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(self._tensors[name].shape.tolist()))

  def dtype(self, name: str) -> str:
    return self._tensors[name].tensor_type.name

  def check_dtype(self, name: str):
    """Raises ``ValueError`` unless the gguf library can dequantize tensor ``name``'s type."""
    t = self._tensors[name]
    if not _dequantizable(_gguf(), t.tensor_type):
      raise ValueError(
        f"GGUF tensor {t.name} ({name}) in {self.path} has type {t.tensor_type.name}, which the "
        "gguf library cannot dequantize; slicjax loads F32, F16, BF16 and the block-quantized "
        "types gguf.quants.dequantize supports (Q4_0, Q4_1, Q8_0, K-quants, ...). Requantize "
        "the file with llama.cpp to one of them."
      )

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Block ``index`` (one slice per axis; ``None``: all) of tensor ``name`` as float32.

    Raises:
      ValueError: for a tensor type the gguf library cannot dequantize, or a Llama query/key
        tensor whose head count the metadata lacks.
    """
    self.check_dtype(name)
    t = self._tensors[name]
    shape = self.shape(name)
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    rows = np.arange(shape[0])[index[0]]
    if name in self._perm_heads:
      key, heads = self._perm_heads[name]
      if heads is None:
        raise ValueError(
          f"{self.path}: GGUF metadata lacks {key}, which is needed to undo llama.cpp's RoPE "
          f"row order of {t.name}; the file is incomplete: convert the model again."
        )
      rows = _unpermute_rows(shape[0], _uniform(heads, key, self.path))[rows]
    cache_key = (name, rows.tobytes())
    if self._last is not None and self._last[:2] == cache_key:
      x = self._last[2]  # sharded loading reads the same rows for several column blocks
    else:
      raw = np.asarray(t.data)
      if len(shape) > 1:
        raw = raw.reshape(shape[0], -1)[rows]  # quantization blocks never cross rows
        x = _gguf().quants.dequantize(raw, t.tensor_type).reshape((len(rows),) + shape[1:])
      else:
        x = _gguf().quants.dequantize(raw, t.tensor_type).reshape(shape)[rows]
      x = np.asarray(x, dtype=np.float32)
      self._last = (*cache_key, x)
    return np.ascontiguousarray(x[(slice(None),) + index[1:]])


def _uniform(value: Any, key: str, path: str) -> int:
  """A per-model count that some files store per layer (an array): all entries must agree."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(
        f"{path}: {key} differs between layers ({sorted(set(value))}); slicjax needs the same "
        "count in every layer."
      )
    value = value[0]
  return int(value)


def _as_source(source_or_path) -> GGUFSource:
  return source_or_path if isinstance(source_or_path, GGUFSource) else GGUFSource(source_or_path)


def gguf_hf_config(source_or_path: GGUFSource | str) -> dict[str, Any]:
  """A Hugging Face config.json dict for a GGUF file, from its metadata.

  Args:
    source_or_path: a :class:`GGUFSource` or the path of a ``.gguf`` file.

  Returns:
    A dict for :func:`~slicjax.interop.hf_config.config_from_hf` (``LlamaForCausalLM`` or
    ``Qwen2ForCausalLM``; ``tie_word_embeddings`` when the file has no ``output.weight``).

  Raises:
    ValueError: for an architecture other than ``llama``/``qwen2`` (listing the supported ones),
      missing metadata, RoPE scaling, mixture-of-experts, partial rotary or unequal key/value head
      sizes; each names the metadata key.
  """
  src = _as_source(source_or_path)
  arch, path = src.architecture, src.path
  if arch not in ARCHITECTURES:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} (general.architecture) is not supported; slicjax loads "
      f"{sorted(ARCHITECTURES)} (Mistral files use 'llama'). Load it with llama.cpp or "
      "transformers instead."
    )

  def get(key, default=None):
    return src.metadata(f"{arch}.{key}", default)

  def need(key):
    value = get(key)
    if value is None:
      raise ValueError(
        f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete or was written by "
        "an unsupported converter. Convert the model again with llama.cpp's convert_hf_to_gguf."
      )
    return value

  experts = get("expert_count") or 0
  if int(experts) > 0:
    raise ValueError(
      f"{path}: {arch}.expert_count={experts}: mixture-of-experts models are not supported; "
      "slicjax's transformer has one dense MLP per layer."
    )
  scaling = get("rope.scaling.type")
  factor = get("rope.scaling.factor")
  linear = get("rope.scale_linear")
  if (
    scaling not in (None, "none")
    or factor not in (None, 0.0, 1.0)
    or linear not in (None, 0.0, 1.0)
    or "rope_freqs.weight" in src.names()
  ):
    raise ValueError(
      f"{path}: RoPE scaling (rope.scaling.type={scaling!r}, rope.scaling.factor={factor}, "
      f"rope.scale_linear={linear}, rope_freqs tensor: {'rope_freqs.weight' in src.names()}) is "
      "not supported; slicjax implements the default (unscaled) RoPE only. Use a model without "
      "RoPE scaling."
    )
  d = int(need("embedding_length"))
  heads = _uniform(need("attention.head_count"), f"{arch}.attention.head_count", path)
  kv_heads = _uniform(
    get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv", path
  )
  key_len, value_len = get("attention.key_length"), get("attention.value_length")
  if key_len is not None and value_len is not None and int(key_len) != int(value_len):
    raise ValueError(
      f"{path}: {arch}.attention.key_length={key_len} differs from value_length={value_len}; "
      "slicjax needs one head size for keys and values."
    )
  rope_dims = get("rope.dimension_count")
  head_dim = int(key_len or value_len or (rope_dims if arch == "llama" else 0) or d // heads)
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ValueError(
      f"{path}: {arch}.rope.dimension_count={rope_dims} is not the head size {head_dim} "
      "(partial rotary embeddings); slicjax rotates whole heads only."
    )
  names = src.names()
  vocab = get("vocab_size")
  if vocab is None and "model.embed_tokens.weight" in names:
    vocab = src.shape("model.embed_tokens.weight")[0]
  if vocab is None and "tokenizer.ggml.tokens" in src.reader.fields:
    vocab = len(src.reader.fields["tokenizer.ggml.tokens"].data)
  if vocab is None:
    raise ValueError(
      f"{path}: the vocabulary size is unknown (no {arch}.vocab_size, token_embd.weight or "
      "tokenizer.ggml.tokens); the file is incomplete."
    )
  hf_arch, model_type = ARCHITECTURES[arch]
  out: dict[str, Any] = dict(
    architectures=[hf_arch],
    model_type=model_type,
    vocab_size=int(vocab),
    hidden_size=d,
    intermediate_size=int(need("feed_forward_length")),
    num_hidden_layers=int(need("block_count")),
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=head_dim,
    hidden_act="silu",
    max_position_embeddings=int(need("context_length")),
    rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
    rope_theta=float(get("rope.freq_base", 10000.0)),
    tie_word_embeddings="lm_head.weight" not in names,
  )
  if model_type == "qwen2":
    out["use_sliding_window"] = False
  else:
    out.update(attention_bias=False, mlp_bias=False)
  for hf_key, key in (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "padding_token_id"),
    ("unk_token_id", "unknown_token_id"),
  ):
    value = src.metadata(f"tokenizer.ggml.{key}")
    if value is not None:
      out[hf_key] = int(value)
  return out


def load_gguf_checkpoint(
  path: str,
  *,
  mesh: jax.sharding.Mesh | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  max_len: int | None = None,
  rules=sharding.DEFAULT_RULES,
) -> tuple[SeqModel, dict]:
  """Loads a GGUF file (Llama or Qwen2 architecture) into a slicjax model.

  Quantized tensors are dequantized on the host with the ``gguf`` library, one tensor (with a
  mesh: one device block) at a time, and stored in ``param_dtype``.

  Args:
    path: a ``.gguf`` file.
    mesh: place each parameter directly into its ``NamedSharding`` on this mesh; ``None`` puts
      them on the default device.
    dtype: the compute dtype (``float32``, ``bfloat16``, ``float16``).
    param_dtype: the parameters' dtype; defaults to ``dtype``.
    max_len: the model's maximum sequence length (also the size of decoding caches); defaults
      to the file's context length (``<arch>.context_length``), which it may not exceed.
    rules: the logical-to-mesh rules table.

  Returns:
    ``(model, params)``: a ``PrefixLM`` :class:`~slicjax.models.seq_model.SeqModel` in the
    file's own token ids (see :func:`load_gguf_tokenizer`) and its parameter tree.

  Raises:
    FileNotFoundError: when ``path`` is not a file.
    ValueError: a truncated or non-GGUF file, an unsupported architecture or metadata feature
      (see :func:`gguf_hf_config`), ``max_len`` beyond the context length, missing or unexpected
      tensors, shape mismatches, tensor types the gguf library cannot dequantize.
  """
  source = GGUFSource(path)
  config_json = gguf_hf_config(source)
  return hf_import.load_from_source(
    config_json,
    source,
    path,
    mesh=mesh,
    dtype=dtype,
    param_dtype=param_dtype,
    max_len=max_len,
    rules=rules,
    config_name="GGUF metadata",
  )


def load_gguf_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer stored in a GGUF file, built by transformers' GGUF tokenizer converter.

  Works offline. Special ids come from the file's ``tokenizer.ggml.*_token_id`` metadata and the
  chat template from ``tokenizer.chat_template`` (``None`` when absent).

  Args:
    path: a ``.gguf`` file.

  Returns:
    An :class:`~slicjax.interop.hf_tokenizer.HFTokenizer` (``kind="tokenizers"``) whose ids are
    the model's (see :func:`load_gguf_checkpoint`).

  Raises:
    FileNotFoundError: when ``path`` is not a file.
    ValueError: a truncated or non-GGUF file, or a tokenizer type transformers cannot convert.
    ImportError: when transformers is not installed.
  """
  source = GGUFSource(path)  # validates the file before transformers reads it
  try:
    from transformers import AutoTokenizer
  except ImportError as e:  # pragma: no cover - transformers ships with the test extra
    raise ImportError(
      "building a tokenizer from a GGUF file needs transformers: pip install transformers."
    ) from e
  directory, filename = os.path.split(os.path.abspath(path))
  try:
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename, local_files_only=True)
  except (ValueError, KeyError, NotImplementedError, OSError) as e:
    kind = source.metadata("tokenizer.ggml.model")
    raise ValueError(
      f"{path}: transformers cannot build the tokenizer (tokenizer.ggml.model={kind!r}): {e}. "
      "Load the model's tokenizer.json with load_hf_tokenizer instead."
    ) from e
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(
      f"{path}: transformers built a {type(tok).__name__} without a tokenizers backend; load the "
      "model's tokenizer.json with load_hf_tokenizer instead."
    )
  specials = {}
  for name, key in (
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("unk", "unknown_token_id"),
    ("pad", "padding_token_id"),
  ):
    value = source.metadata(f"tokenizer.ggml.{key}")
    specials[name] = None if value is None else int(value)
  return HFTokenizer(
    backend,
    "tokenizers",
    specials,
    path,
    chat_template=source.metadata("tokenizer.chat_template"),
  )
