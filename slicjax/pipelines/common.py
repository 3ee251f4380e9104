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


def model_from(config):
  return build_model(to_dict(config.model))


def prepare_workdir(workdir: str, config=None) -> str:
  if not workdir:
    raise ValueError("--workdir is required: a directory for checkpoints, metrics and reports.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
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
