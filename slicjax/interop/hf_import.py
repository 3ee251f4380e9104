"""Loads Hugging Face T5 and Llama-family safetensors checkpoints into slicjax transformers.

::

    model, params = load_hf_checkpoint("/ckpts/flan-t5-small")           # host -> default device
    model, params = load_hf_checkpoint(path, mesh=mesh, dtype="bfloat16")  # straight into shards

With a mesh every parameter is created by ``jax.make_array_from_callback``: each device's block
is read from the safetensors file on its own (``safe_open(...).get_slice``), so the full model is
never held on the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from slicjax import sharding
from slicjax.interop import hf_config, mappings
from slicjax.models import factory, layers
from slicjax.models.seq_model import SeqModel
from slicjax.models.transformer import TransformerConfig

SUPPORTED_DTYPES = ("F32", "F16", "BF16", "F64")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _safe_open():
  try:
    from safetensors import safe_open
  except ImportError as e:  # pragma: no cover - safetensors ships with the hf extra
    raise ImportError(
      "reading Hugging Face checkpoints needs safetensors: pip install 'slicjax[hf]'."
    ) from e
  return safe_open


class SafetensorsSource:
  """The tensors of a checkpoint directory: one ``model.safetensors`` or shards plus an index.

  Args:
    path: a directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and its
      shards, or one ``.safetensors`` file.

  Raises:
    FileNotFoundError: when there is no safetensors file (naming what was found instead).
  """

  def __init__(self, path: str):
    self.path = path
    if os.path.isfile(path):
      files = {None: path}
      directory = os.path.dirname(path)
    else:
      directory = path
      index = os.path.join(path, INDEX_FILE)
      single = os.path.join(path, SINGLE_FILE)
      if os.path.isfile(index):
        with open(index) as f:
          weight_map = json.load(f).get("weight_map") or {}
        if not weight_map:
          raise ValueError(f"{index} has no weight_map; re-save the checkpoint.")
        files = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
      elif os.path.isfile(single):
        files = {None: single}
      else:
        others = sorted(
          f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".h5", ".msgpack"))
        )
        hint = (
          f" It holds {others}: re-save it as safetensors with transformers "
          "(model.save_pretrained(path, safe_serialization=True))."
          if others
          else ""
        )
        raise FileNotFoundError(
          f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; slicjax reads safetensors checkpoints "
          f"only.{hint}"
        )
    self.directory = directory
    missing = sorted({f for f in files.values() if not os.path.isfile(f)})
    if missing:
      raise FileNotFoundError(
        f"checkpoint shard(s) {missing} listed in the index are missing; download the complete "
        "checkpoint."
      )
    safe_open = _safe_open()
    self._handles: dict[tuple[str, str], Any] = {}
    self._where: dict[str, str] = {}
    for fn in sorted(set(files.values())):
      handle = safe_open(fn, framework="numpy")
      self._handles[(fn, "numpy")] = handle
      for name in handle.keys():
        if None in files or files.get(name) == fn:
          self._where[name] = fn
    listed = {n for n in files if n is not None}
    absent = sorted(listed - set(self._where))
    if absent:
      raise ValueError(
        f"tensor(s) {absent[:5]} are listed in {INDEX_FILE} but not found in their shard files; "
        "the checkpoint is damaged: download it again."
      )

  def names(self) -> set[str]:
    return set(self._where)

  def _slice(self, name: str, framework: str = "numpy"):
    fn = self._where[name]
    key = (fn, framework)
    if key not in self._handles:
      self._handles[key] = _safe_open()(fn, framework=framework)
    return self._handles[key].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._slice(name).get_dtype()

  def check_dtype(self, name: str):
    """Raises ``ValueError`` unless tensor ``name`` has a dtype slicjax can read."""
    dt = self.dtype(name)
    if dt not in SUPPORTED_DTYPES:
      raise ValueError(
        f"tensor {name} has dtype {dt}; slicjax loads float checkpoints "
        f"({', '.join(SUPPORTED_DTYPES)}) only. Dequantize it first (load with transformers and "
        "save_pretrained in float32 or bfloat16)."
      )

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """A block of tensor ``name`` as a numpy array in the file's dtype."""
    self.check_dtype(name)
    dt = self.dtype(name)
    if dt == "BF16":  # numpy has no bfloat16: read through jax on the host CPU
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(self._slice(name, "flax")[index])
    return np.asarray(self._slice(name)[index])


def _read_config(path: str) -> dict[str, Any]:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
      f"no config.json next to the checkpoint in {directory}; copy the model's config.json "
      "there (it describes the architecture)."
    )
  with open(cfg_path) as f:
    return json.load(f)


def build_from_hf_config(
  config_json: dict[str, Any],
  tensor_names=(),
  *,
  max_len: int | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
) -> tuple[str, TransformerConfig, float, SeqModel]:
  """``(family, TransformerConfig, head_scale, SeqModel)`` for a config.json dict."""
  family, cfg, head_scale = hf_config.config_from_hf(
    config_json, tensor_names, max_len=max_len, dtype=dtype, param_dtype=param_dtype
  )
  model = factory.build_model({"family": "transformer", **dataclasses.asdict(cfg)})
  return family, cfg, head_scale, model


def abstract_params(model: SeqModel):
  """Boxed abstract parameters (shapes, dtypes and logical axis names), computing nothing."""
  fn = model.init_fn(batch_size=1, input_len=1, target_len=1)
  return jax.eval_shape(fn, jax.random.PRNGKey(0))["params"]


def load_hf_checkpoint(
  path: str,
  *,
  mesh: jax.sharding.Mesh | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  max_len: int | None = None,
  rules=sharding.DEFAULT_RULES,
) -> tuple[SeqModel, dict]:
  """Loads a Hugging Face checkpoint directory into a slicjax model.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors
      with ``model.safetensors.index.json``).
    mesh: place each parameter directly into its ``NamedSharding`` on this mesh (from the
      parameters' logical axis names and ``rules``); ``None`` puts them on the default device.
    dtype: the compute dtype (``float32``, ``bfloat16``, ``float16``).
    param_dtype: the parameters' dtype; defaults to ``dtype``.
    max_len: the model's maximum sequence length (also the size of decoding caches); defaults
      to ``max_position_embeddings`` (capped by a sliding window) or T5's ``n_positions``/512;
      a Llama-family ``max_len`` beyond either is an error.
    rules: the logical-to-mesh rules table.

  Returns:
    ``(model, params)``: a :class:`~slicjax.models.seq_model.SeqModel` (``PrefixLM`` for the
    Llama family, ``EncoderDecoder`` for T5) and its parameter tree.

  Raises:
    FileNotFoundError: missing config or safetensors files.
    ValueError: unsupported architecture or config feature, missing or unexpected tensors,
      shape mismatches, unsupported dtypes; each names the tensor and the fix.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"checkpoint path {path} does not exist; pass a local directory saved with "
      "transformers' save_pretrained (slicjax does not download models)."
    )
  config_json = _read_config(path)
  source = SafetensorsSource(path)
  return load_from_source(
    config_json,
    source,
    path,
    mesh=mesh,
    dtype=dtype,
    param_dtype=param_dtype,
    max_len=max_len,
    rules=rules,
  )


def load_from_source(
  config_json: dict[str, Any],
  source,
  path: str,
  *,
  mesh: jax.sharding.Mesh | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  max_len: int | None = None,
  rules=sharding.DEFAULT_RULES,
  config_name: str = "config.json",
) -> tuple[SeqModel, dict]:
  """Builds the model a config.json dict describes and reads its parameters from ``source``.

  The body shared by :func:`load_hf_checkpoint` and GGUF import.

  Args:
    config_json: a Hugging Face config.json dict.
    source: the tensors, in Hugging Face naming and layout: an object with ``names()``,
      ``shape(name)``, ``dtype(name)``, ``check_dtype(name)`` (raises ``ValueError`` for a dtype
      it cannot read) and ``read(name, index)`` (a block as a numpy array), like
      :class:`SafetensorsSource`.
    path: the checkpoint's path, for messages.
    mesh, dtype, param_dtype, max_len, rules: as in :func:`load_hf_checkpoint`.
    config_name: what ``config_json`` came from, for messages.

  Returns:
    ``(model, params)`` as :func:`load_hf_checkpoint` returns them.

  Raises:
    ValueError: unsupported architecture or config feature, missing or unexpected tensors,
      shape mismatches, unsupported dtypes; each names the tensor and the fix.
  """
  names = source.names()
  family, cfg, head_scale, model = build_from_hf_config(
    config_json, names, max_len=max_len, dtype=dtype, param_dtype=param_dtype
  )
  abstract = abstract_params(model)
  flat = mappings.flatten(nn.unbox(abstract))
  maps = mappings.tensor_maps(family, cfg, list(flat), head_scale=head_scale)
  wanted = {m.hf_name for m in maps}
  missing = sorted(wanted - names)
  if missing:
    raise ValueError(
      f"checkpoint {path} lacks tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
      f"that its {config_name} ({family} family, {cfg.num_layers} layers) requires; the files "
      f"are incomplete or {config_name} belongs to another model."
    )
  tied = cfg.tie_embeddings
  extra = sorted(n for n in names - wanted if not mappings.ignorable(family, n, tied))
  if extra:
    raise ValueError(
      f"checkpoint {path} has unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
      f"that a {family} model of this {config_name} does not use; check that {config_name} "
      "matches the weights (layer counts, architecture) and merge any adapters (e.g. LoRA) first."
    )
  ignored = sorted(n for n in names - wanted)
  if ignored:
    log = logging.warning if "lm_head.weight" in ignored else logging.info
    log(
      "ignoring checkpoint tensors not used by slicjax: %s (%s ties the output head "
      "to the embedding, so lm_head.weight, if listed, is not read)",
      ignored,
      config_name,
    )
  for m in maps:
    expect = m.hf_shape(flat[m.path].shape)
    got = source.shape(m.hf_name)
    if got != expect:
      raise ValueError(
        f"tensor {m.hf_name} has shape {list(got)} but {config_name} implies {list(expect)} "
        f"(slicjax parameter {'/'.join(m.path)}); {config_name} does not match the weights."
      )
    source.check_dtype(m.hf_name)

  pdt = layers.dtype_of(param_dtype or dtype)
  shardings = None
  if mesh is not None:
    shardings = mappings.flatten(sharding.tree_shardings(mesh, abstract, rules))
  out = {}
  for m in maps:
    shape = flat[m.path].shape

    def read(index, m=m, shape=shape):
      block = mappings.read_block(m, shape, lambda ix: source.read(m.hf_name, ix), index)
      return block.astype(pdt)

    if mesh is None:
      out[m.path] = jnp.asarray(read(None))
    else:
      out[m.path] = jax.make_array_from_callback(shape, shardings[m.path], read)
  return model, mappings.unflatten(out)
