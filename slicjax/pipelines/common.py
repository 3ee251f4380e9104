"""Shared set-up for jobs: config handling, mesh, model, logging of devices."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from slicjax import sharding
from slicjax.models.factory import build_model
from slicjax.pipelines import validation


def to_dict(cfg) -> dict[str, Any]:
  if cfg is None:
    return {}
  if isinstance(cfg, ml_collections.ConfigDict):
    return cfg.to_dict()
  return dict(cfg)


def check_keys(cfg: dict[str, Any], allowed: set[str] | dict, section: str):
  """Raises on unknown keys so a typo in a config never silently does nothing."""
  unknown = sorted(set(cfg) - set(allowed))
  if unknown:
    raise ValueError(
      f"unknown key(s) {unknown} in config section '{section}'; valid keys: {sorted(allowed)}."
    )


def log_devices():
  quiet_library_logs()
  logging.info(
    "JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    jax.devices()[0].platform,
  )


def make_mesh(config) -> jax.sharding.Mesh:
  shape = tuple(config.get("mesh_shape", (-1, 1, 1)))
  return sharding.make_mesh(shape)


# ``config.pretrained``: start a job from a pretrained checkpoint (a .gguf file, a Hugging Face
# directory or a slicjax workdir) instead of ``config.model``; see slicjax.interop.pretrained.
PRETRAINED_KEYS = dict(
  init_from="", prompt_format="chat", instruction="", system_prompt="",
  raw_template="{instruction}{input}\n", max_len=0, dtype="float32",
)
# ``config.lora``: rank > 0 trains LoRA adapters on the kernels matching ``targets`` (a regex
# over parameter paths) and freezes every base weight; see slicjax.peft.
LORA_KEYS = dict(rank=0, alpha=16.0, targets="query|value")

_PRETRAINED_CACHE: dict[tuple, tuple] = {}


def pretrained_config(config) -> dict[str, Any]:
  d = to_dict(config.get("pretrained"))
  check_keys(d, PRETRAINED_KEYS, "pretrained")
  return {**PRETRAINED_KEYS, **d}


def lora_config(config) -> dict[str, Any]:
  d = to_dict(config.get("lora"))
  check_keys(d, LORA_KEYS, "lora")
  return {**LORA_KEYS, **d}


def pretrained(config):
  """``(model, params, tokenizer)`` of ``config.pretrained.init_from``, or ``None`` when unset.

  Loaded once per process and configuration (every stage of a pipeline asks for it). The
  model's ``max_len`` is ``pretrained.max_len``, or else fits ``data.input_len +
  data.target_len`` (decode caches are that long).
  """
  p = pretrained_config(config)
  if not p["init_from"]:
    return None
  from slicjax.interop import pretrained as pretrained_lib
  from slicjax.pipelines import tasks

  d = tasks.data_config(config)
  if not p["max_len"] and not (d["input_len"] and d["target_len"]):
    raise ValueError(
      "data.input_len / data.target_len = 0 (choose from the data) with pretrained.init_from "
      "needs pretrained.max_len (the decode cache length, >= input_len + target_len + 1) set, "
      "since the lengths are known only after the model's tokenizer loads; or set both lengths."
    )
  max_len = int(p["max_len"]) or pretrained_lib.auto_max_len(d["input_len"], d["target_len"])
  key = (
    os.path.abspath(p["init_from"]), max_len, p["dtype"], p["prompt_format"], p["instruction"],
    p["system_prompt"], p["raw_template"],
  )
  if key not in _PRETRAINED_CACHE:
    _PRETRAINED_CACHE.clear()  # one pretrained model resident at a time
    _PRETRAINED_CACHE[key] = pretrained_lib.load_pretrained(
      p["init_from"], max_len=max_len, dtype=p["dtype"], prompt_format=p["prompt_format"],
      instruction=p["instruction"], system_prompt=p["system_prompt"],
      raw_template=p["raw_template"],
    )
  return _PRETRAINED_CACHE[key]


def model_from(config):
  """The job's model: the pretrained one when ``pretrained.init_from`` is set, else
  ``config.model`` (``build_model``)."""
  pre = pretrained(config)
  if pre is not None:
    return pre[0]
  return build_model(to_dict(config.model))


def maybe_lora(config, model, params, seed: int = 0):
  """``(model, params)`` with fresh LoRA adapters when ``config.lora.rank > 0``, else as given.

  Adapted params given here are merged first, so every training stage starts new adapters on
  the weights it received. The optimizer freezes the base by itself (``slicjax.optim``).

  Raises:
    ValueError: LoRA asked for without weights to adapt.
  """
  lo = lora_config(config)
  if not lo["rank"]:
    return model, params
  from slicjax import peft

  if params is None:
    raise ValueError(
      "lora.rank > 0 adapts existing weights, but this job has none: set "
      "pretrained.init_from (or the stage's workdir), or set lora.rank=0 to train from scratch."
    )
  model, params = peft.merge(model, params)
  model, params = peft.add_lora(
    model, params, rank=int(lo["rank"]), alpha=float(lo["alpha"]), targets=lo["targets"],
    rng=jax.random.PRNGKey(seed + 17),
  )
  trainable, total = peft.count_params(params)
  logging.info("LoRA rank %d on %r: %d trainable of %d parameters", lo["rank"], lo["targets"],
               trainable, total)
  return model, params


def params_from(config, workdir: str, what: str):
  """Parameters to start from: ``workdir``'s newest checkpoint (LoRA adapters merged) when
  given, else the pretrained checkpoint's.

  Raises:
    ValueError: neither is set (``what`` names the config key to set).
  """
  if workdir:
    from slicjax.interop import pretrained as pretrained_lib

    return pretrained_lib.workdir_params(workdir)[0]
  pre = pretrained(config)
  if pre is not None:
    return pre[1]
  raise ValueError(
    f"{what} is empty and pretrained.init_from is unset: point {what} at a training run's "
    "workdir, or set pretrained.init_from to a .gguf file / Hugging Face directory."
  )


def compilation_cache_dir() -> str:
  """``$SLICJAX_CACHE_DIR/jax_compilation`` or ``~/.cache/slicjax/jax_compilation``."""
  root = os.environ.get("SLICJAX_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "slicjax"
  )
  return os.path.join(root, "jax_compilation")


def enable_compilation_cache(config=None) -> str | None:
  """Turns on JAX's persistent compilation cache for this process. Config key
  ``compilation_cache``: ``"default"`` (the default) uses :func:`compilation_cache_dir`, any
  other string is the directory, ``"off"`` or ``""`` turns it off. A second run of a binary with
  the same shapes then loads its programs from disk instead of compiling them again. Returns
  the directory, or None when off."""
  setting = "default" if config is None else config.get("compilation_cache", "default")
  if setting is None or str(setting).strip().lower() in ("", "off", "false", "none"):
    return None
  setting = str(setting)
  path = compilation_cache_dir() if setting == "default" else os.path.expanduser(setting)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning(
      "compilation cache off: cannot create %s (%s); set compilation_cache to a writable "
      "directory or to 'off'.", path, e,
    )
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program that took at least half a second to compile, whatever its size.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def prepare_workdir(workdir: str, config=None) -> str:
  enable_compilation_cache(config)
  workdir = validation.workdir(workdir)
  if config is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(to_dict(config), f, indent=2, default=str)
  return workdir


class _DropOrbaxInfo:
  """Hides orbax's per-save INFO chatter (it logs several lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= 30 or "orbax" not in (record.pathname or "")


def quiet_library_logs():
  import logging as pylogging

  for handler in pylogging.getLogger().handlers + pylogging.getLogger("absl").handlers:
    handler.addFilter(_DropOrbaxInfo())
  pylogging.getLogger("absl").addFilter(_DropOrbaxInfo())
