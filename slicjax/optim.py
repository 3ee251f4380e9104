"""Optimizers and learning-rate schedules from config (optax)."""

from __future__ import annotations

from typing import Any

import optax

DEFAULTS: dict[str, Any] = dict(
  name="adamw", learning_rate=1e-3, warmup_steps=0, schedule="cosine", decay_steps=0,
  end_lr_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-9, clip_norm=1.0,
  grad_accum_steps=1,
)


def make_schedule(cfg: dict[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup then ``cosine``, ``rsqrt``, ``linear`` or ``constant``."""
  lr, warm = float(cfg["learning_rate"]), int(cfg["warmup_steps"])
  decay = int(cfg.get("decay_steps") or max(total_steps - warm, 1))
  kind = cfg["schedule"]
  if kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay, alpha=cfg["end_lr_fraction"])
  elif kind == "linear":
    after = optax.linear_schedule(lr, lr * cfg["end_lr_fraction"], decay)
  elif kind == "rsqrt":
    def after(step):
      return lr * (max(warm, 1) ** 0.5) / ((step + max(warm, 1)) ** 0.5)
  elif kind == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {kind!r}; use cosine, linear, rsqrt or constant.")
  if warm <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, schedule)``. ``cfg`` keys: see :data:`DEFAULTS`; unknown keys raise."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown optimizer config key(s) {unknown}; valid: {sorted(DEFAULTS)}.")
  cfg = {**DEFAULTS, **cfg}
  schedule = make_schedule(cfg, total_steps)
  name = cfg["name"]
  if name == "adamw":
    opt = optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                      weight_decay=cfg["weight_decay"])
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=cfg["weight_decay"] or None)
  elif name == "sgd":
    opt = optax.sgd(schedule)
  else:
    raise ValueError(f"unknown optimizer {name!r}; use adamw, adafactor or sgd.")
  parts = []
  if cfg["clip_norm"]:
    parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
  parts.append(opt)
  tx = optax.chain(*parts)
  if int(cfg["grad_accum_steps"]) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(cfg["grad_accum_steps"]))
  return tx, schedule
