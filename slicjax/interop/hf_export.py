"""Writes slicjax transformers as Hugging Face checkpoints (safetensors + config.json).

Decoder-only models become ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the config has
``qkv_bias``), encoder-decoders ``T5ForConditionalGeneration``; ``transformers`` loads the result
with ``AutoModelForCausalLM`` / ``T5ForConditionalGeneration.from_pretrained``.

A model that started from a pretrained checkpoint (``load_pretrained``; ``pretrained.init_from``
in a job) is exported in that checkpoint's own vocabulary order and special ids, with its
``tokenizer.json`` and chat template, so ``AutoTokenizer`` + ``AutoModelForCausalLM`` load it and
prompts are formatted as during training. A model trained from scratch by slicjax keeps slicjax's
conventions (pad 0, eos 1, bos 2); as a prefix LM it expects prompts laid out as
``inputs + [BOS]``, so prompt it the same way in ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from slicjax.interop import hf_config, hf_import, mappings
from slicjax.models import factory, layers
from slicjax.models.seq_model import SeqModel
from slicjax.models.transformer import TransformerConfig


def transformer_config(model_or_config) -> TransformerConfig:
  """The :class:`TransformerConfig` behind a SeqModel, a module, a config or a config dict.

  Raises:
    ValueError: for a non-transformer model (SSM, diffusion) or an unusable object.
  """
  obj = model_or_config
  if isinstance(obj, TransformerConfig):
    return obj
  if isinstance(obj, SeqModel):
    obj = obj.module
  cfg = getattr(obj, "cfg", None)
  if isinstance(cfg, TransformerConfig):
    return cfg
  if hasattr(obj, "to_dict") or isinstance(obj, dict):
    d = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    family = d.get("family", "transformer")
    if family != "transformer":
      raise ValueError(
        f"model family {family!r} cannot be exported to Hugging Face; only transformer models "
        "(decoder-only -> Llama, encoder-decoder -> T5) can."
      )
    return factory.build_model(d).module.cfg
  raise ValueError(
    f"cannot export {type(model_or_config).__name__}: pass a slicjax transformer SeqModel, "
    "TransformerLM / EncoderDecoderTransformer, TransformerConfig or a model config dict "
    "(family='transformer')."
  )


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_state_dict(
  model_or_config, params, *, dtype: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(config.json dict, {hf_name: array})`` of a slicjax transformer, without writing files.

  Raises:
    ValueError: when the config cannot be expressed by the target architecture, or ``params``
      does not match the config (naming the parameter).
  """
  cfg = transformer_config(model_or_config)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  params = nn.unbox(params)
  out_dtype = dtype or cfg.param_dtype
  family, hf_cfg = hf_config.config_to_hf(cfg, dtype=out_dtype)
  model = factory.build_model({"family": "transformer", **dataclasses.asdict(cfg)})
  expect = mappings.flatten(nn.unbox(hf_import.abstract_params(model)))
  got = mappings.flatten(params)
  missing = sorted("/".join(p) for p in set(expect) - set(got))
  extra = sorted("/".join(p) for p in set(got) - set(expect))
  if missing or extra:
    raise ValueError(
      f"params do not match the model config: missing {missing[:6]}, unexpected {extra[:6]}; "
      "pass the params of this model (e.g. TrainState.params, not the whole state)."
    )
  for p, a in expect.items():
    if tuple(got[p].shape) != tuple(a.shape):
      raise ValueError(
        f"parameter {'/'.join(p)} has shape {tuple(got[p].shape)} but the config implies "
        f"{tuple(a.shape)}; the params belong to a different config."
      )
  np_dtype = np.dtype(layers.dtype_of(out_dtype))
  tensors: dict[str, np.ndarray] = {}
  for m in mappings.tensor_maps(family, cfg, sorted(got)):
    x = _host(got[m.path]).astype(np.float32)
    if family == "t5" and cfg.scale_queries and m.path[-2] == "query":
      x = x * np.float32(cfg.head_dim**-0.5)  # T5 attention has no 1/sqrt(d): fold it in
    tensors[m.hf_name] = m.to_hf(x)
  if family == "t5" and cfg.tie_embeddings and not cfg.tied_logit_scale:
    tensors["lm_head.weight"] = tensors["shared.weight"]  # tied, unscaled: explicit head
  tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()}
  return hf_cfg, tensors


def _special_ids(tokenizer) -> dict[str, int]:
  """config.json special ids in the model's own vocabulary."""
  hf = getattr(tokenizer, "hf", tokenizer)
  out = {}
  for name in ("pad", "eos", "bos"):
    tid = getattr(hf, f"{name}_id", None)
    if tid is not None:
      out[f"{name}_token_id"] = int(tid)
  return out


def write_tokenizer(tokenizer, out_dir: str) -> None:
  """Writes ``tokenizer.json`` + ``tokenizer_config.json`` (or the SentencePiece model).

  Raises:
    ValueError: for a tokenizer object slicjax cannot save.
  """
  from slicjax.interop.pretrained import _token_text

  hf = getattr(tokenizer, "hf", tokenizer)
  backend = getattr(hf, "_backend", None)
  kind = getattr(hf, "kind", None)
  tok_cfg: dict[str, Any] = {"model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
  if kind == "tokenizers":
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  elif kind == "sentencepiece":
    import shutil

    shutil.copyfile(hf.path, os.path.join(out_dir, "tokenizer.model"))
    tok_cfg["tokenizer_class"] = "LlamaTokenizer"
  else:
    raise ValueError(
      f"cannot save a {type(tokenizer).__name__}; export writes Hugging Face tokenizers "
      "(tokenizer.json) or SentencePiece models."
    )
  for name in ("bos", "eos", "pad", "unk"):
    tid = getattr(hf, f"{name}_id", None)
    if tid is not None:
      tok_cfg[f"{name}_token"] = _token_text(hf, tid)
  tok_cfg["add_bos_token"] = bool(getattr(tokenizer, "add_bos", False))
  tok_cfg["add_eos_token"] = False
  template = getattr(tokenizer, "chat_template", None) or getattr(hf, "chat_template", None)
  if template:
    tok_cfg["chat_template"] = template
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tok_cfg, f, indent=2)


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int | None):
  names = sorted(tensors)
  if not max_shard_bytes:
    return [names]
  shards, cur, size = [], [], 0
  for n in names:
    b = tensors[n].nbytes
    if cur and size + b > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(n)
    size += b
  if cur:
    shards.append(cur)
  return shards


def export_hf_checkpoint(
  model_or_config,
  params,
  out_dir: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int | None = None,
  tokenizer=None,
) -> str:
  """Writes ``config.json``, ``generation_config.json`` and safetensors weights to ``out_dir``.

  Args:
    model_or_config: a transformer SeqModel / module / TransformerConfig / config dict.
    params: its parameter tree (host or device arrays, sharded is fine).
    out_dir: created if missing.
    dtype: the saved dtype (``float32``, ``bfloat16``, ``float16``); defaults to the config's
      ``param_dtype``.
    max_shard_bytes: split the weights into ``model-0000i-of-0000n.safetensors`` files of at
      most this size plus ``model.safetensors.index.json``; ``None`` writes one file.
    tokenizer: the model's :class:`~slicjax.interop.pretrained.PretrainedTokenizer` (what
      ``load_pretrained`` returns): the vocabulary goes back to the model's own id order, the
      config gets its special ids, and ``tokenizer.json`` / ``tokenizer_config.json`` (with the
      chat template) are written so ``AutoTokenizer`` loads the directory.

  Returns:
    ``out_dir``.

  Raises:
    ValueError: when the config cannot be expressed by the target architecture (naming the
      fields) or ``params`` does not fit the config.
  """
  from safetensors.numpy import save_file

  if tokenizer is not None and hasattr(tokenizer, "vocab_map"):
    params = tokenizer.vocab_map.unpermute_params(nn.unbox(params))
  hf_cfg, tensors = hf_state_dict(model_or_config, params, dtype=dtype)
  if tokenizer is not None:
    hf_cfg = {**hf_cfg, **_special_ids(tokenizer)}
  if jax.process_index() != 0:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  if tokenizer is not None:
    write_tokenizer(tokenizer, out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  gen = {
    "pad_token_id": hf_cfg["pad_token_id"],
    "eos_token_id": hf_cfg["eos_token_id"],
    **(
      {"decoder_start_token_id": hf_cfg["decoder_start_token_id"]}
      if "decoder_start_token_id" in hf_cfg
      else {"bos_token_id": hf_cfg["bos_token_id"]}
    ),
  }
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  for stale in (hf_import.SINGLE_FILE, hf_import.INDEX_FILE):
    if os.path.exists(os.path.join(out_dir, stale)):
      os.remove(os.path.join(out_dir, stale))
  shards = _shards(tensors, max_shard_bytes)
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(
      {n: tensors[n] for n in shards[0]}, os.path.join(out_dir, hf_import.SINGLE_FILE), meta
    )
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file({n: tensors[n] for n in names}, os.path.join(out_dir, fn), meta)
      weight_map.update({n: fn for n in names})
    total = int(sum(t.nbytes for t in tensors.values()))
    with open(os.path.join(out_dir, hf_import.INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  for fn in os.listdir(out_dir):  # readable by everyone, like save_pretrained's output
    os.chmod(os.path.join(out_dir, fn), 0o644)
  logging.info(
    "exported %s (%d tensors, %d file(s)) to %s",
    hf_cfg["architectures"][0],
    len(tensors),
    len(shards),
    out_dir,
  )
  return out_dir


def export_from_workdir(workdir: str, out_dir: str, *, step: int | None = None, dtype=None) -> str:
  """Exports the params of a training run (``<workdir>/checkpoints/<step>``) to ``out_dir``.

  The model comes from the ``model`` section of ``<workdir>/config.json`` (written by every
  slicjax job).

  Raises:
    FileNotFoundError: no ``config.json`` in ``workdir``.
    slicjax.checkpoint.CheckpointError: no readable checkpoint.
  """

  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
      f"{cfg_path} not found; --workdir must be the directory of a slicjax training run (it "
      "holds config.json and checkpoints/)."
    )
  with open(cfg_path) as f:
    job = json.load(f)
  if "model" not in job:
    raise ValueError(f"{cfg_path} has no 'model' section; it was not written by a slicjax job.")
  if (job.get("pretrained") or {}).get("init_from"):  # tokenizer and vocabulary order too
    from slicjax.interop import pretrained

    model, _, tok = pretrained.load_pretrained(workdir)
    params, used = pretrained.workdir_params(workdir, job, step)
    logging.info("exporting step %d of %s", used, workdir)
    return export_hf_checkpoint(model, params, out_dir, dtype=dtype, tokenizer=tok)
  from slicjax.interop import pretrained

  params, used = pretrained.workdir_params(workdir, job, step)
  logging.info("exporting step %d of %s", used, workdir)
  return export_hf_checkpoint(job["model"], params, out_dir, dtype=dtype)
