"""Up-front checks: everything a job can check from its config is checked in its first seconds,
before data, weights or checkpoints load, so a typo costs a second, not a minute of loading.

Value checks (``count``, ``finite``, ``optimizer``) raise ``ValueError`` naming the config key,
the bad value and the fix; path checks (``workdir``, ``run_dir``, ``candidates_dir``) name the
path; ``model_matches_run`` compares the job's model with the shapes stored in a run's newest
checkpoint (metadata only) and names the differing ``model`` keys from the run's
``config.json``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from typing import Any

import jax


def workdir(path: str, key: str = "--workdir") -> str:
  """The absolute workdir, created; raises when it is a file or cannot be written."""
  if not path:
    raise ValueError(f"{key} is required: a directory for checkpoints, metrics and reports.")
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
      f"{key}={path} is a file, not a directory; pass a directory path (it is created) or "
      "move the file away."
    )
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as e:
    raise ValueError(
      f"{key}={path} cannot be written ({e.strerror or e}); pass a directory you can write to."
    ) from None
  return path


def count(value: Any, key: str, minimum: int = 1) -> int:
  """``value`` as an int ``>= minimum``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{key}={value!r} must be an integer >= {minimum}; set it to one.")
  return int(value)


def finite(value: Any, key: str, *, low: float = 0.0, low_inclusive: bool = False,
           high: float | None = None, what: str = "") -> float:
  """``value`` as a finite float above ``low`` (inclusive when ``low_inclusive``) and at most
  ``high``."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  v = float(value) if ok else float("nan")
  if ok and math.isfinite(v):
    ok = (v >= low if low_inclusive else v > low) and (high is None or v <= high)
  else:
    ok = False
  if not ok:
    rng = f"{'[' if low_inclusive else '('}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
    raise ValueError(
      f"{key}={value!r} must be a finite number in {rng}{'; ' + what if what else ''}."
    )
  return v


def optimizer(config) -> None:
  """Learning rate finite and > 0, warm-up/decay steps >= 0, weight decay and clipping >= 0."""
  from slicjax import optim
  from slicjax.pipelines import common

  o = {**optim.DEFAULTS, **common.to_dict(config.get("optimizer"))}
  finite(o.get("learning_rate"), "optimizer.learning_rate",
         what="a NaN or non-positive rate makes every update NaN or zero (try 1e-4)")
  for k in ("warmup_steps", "decay_steps"):
    if k in o:
      count(o[k], f"optimizer.{k}", minimum=0)
  for k in ("weight_decay", "clip_norm"):
    if k in o and o[k] is not None:
      finite(o[k], f"optimizer.{k}", low_inclusive=True)


def _steps(path: str) -> list[int]:
  d = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def run_dir(path: str, key: str) -> str:
  """A training run's workdir: exists and holds at least one checkpoint step."""
  if not path:
    return path
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(full):
    raise ValueError(
      f"{key}={path} does not exist; point it at the workdir of a finished training run "
      "(it contains checkpoints/<step>/)."
    )
  if not _steps(full):
    raise ValueError(
      f"{key}={path} holds no checkpoint (no checkpoints/<step>/); train into it first or "
      "point at another run's workdir."
    )
  return full


def candidates_dir(path: str, key: str) -> str:
  """A candidate directory written by generate_candidates: exists and has chunks."""
  if not path:
    raise ValueError(f"{key} is empty; point it at a generate_candidates output directory.")
  if not os.path.isdir(path):
    raise ValueError(
      f"{key}={path} does not exist; run generate_candidates with --workdir={path} first."
    )
  if not any(n.startswith("chunk-") and n.endswith(".jsonl") for n in os.listdir(path)):
    raise ValueError(f"no candidate chunks in {path}; run generate_candidates first.")
  return path


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  from slicjax.checkpoint import _path_str

  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(x.shape) for p, x in flat}


def model_matches_run(config, path: str, key: str) -> None:
  """Raises when the job's ``model`` cannot load the parameters of the run in ``path``.

  Compares parameter shapes (the newest checkpoint's metadata against ``jax.eval_shape`` of
  the job's model); skipped when the job's model comes from ``pretrained.init_from``.
  """
  from slicjax import checkpoint
  from slicjax.models.factory import build_model
  from slicjax.pipelines import common

  if not path or common.pretrained_config(config)["init_from"]:
    return
  stored, step = checkpoint.param_shapes(path)
  if stored and all(k.startswith(("base/", "lora/")) for k in stored):  # a LoRA run
    stored = {k[len("base/"):]: v for k, v in stored.items() if k.startswith("base/")}
  model = build_model(common.to_dict(config.model))
  abstract = jax.eval_shape(
    lambda r: model.init(r, input_len=4, target_len=4), jax.random.PRNGKey(0)
  )
  mine = _flat_shapes(abstract)
  diff = sorted(
    f"{k}: checkpoint {stored.get(k, 'absent')} vs model {mine.get(k, 'absent')}"
    for k in set(stored) | set(mine) if stored.get(k) != mine.get(k)
  )
  if not diff:
    return
  fix = "set --config.model.<key> to the run's values (its config.json 'model' section)"
  cfg_path = os.path.join(os.path.abspath(path), "config.json")
  if os.path.isfile(cfg_path):
    from slicjax.models import factory

    with open(cfg_path) as f:
      run_model = json.load(f).get("model") or {}
    try:  # compare resolved values: unset keys take the preset's / family's default
      run_model = factory.effective_model_config(run_model)
      job_model = factory.effective_model_config(common.to_dict(config.model))
    except (ValueError, TypeError):
      job_model = common.to_dict(config.model)
    keys = sorted(k for k in run_model if run_model[k] != job_model.get(k))
    if keys:
      fix = "set " + " ".join(f"--config.model.{k}={run_model[k]}" for k in keys) + (
        " (the run's values, from its config.json)"
      )
  raise ValueError(
    f"{key}={path} (step {step}) was trained with another model config; {fix}. "
    f"{len(diff)} parameter(s) differ, e.g. {diff[:2]}."
  )


def file_or_dir(path: str, key: str, what: str) -> str:
  if not path or not os.path.exists(path):
    raise ValueError(f"{key}={path!r} does not exist; {what}.")
  return path
