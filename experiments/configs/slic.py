"""SLiC config: candidates, calibration and evaluation sections on top of the MLE config.

  python experiments/generate_candidates.py --config=experiments/configs/slic.py \
      --config.candidates.finetuned_workdir=runs/mle --workdir=runs/candidates
  python experiments/calibrate.py --config=experiments/configs/slic.py \
      --config.calibrate.finetuned_workdir=runs/mle \
      --config.calibrate.candidates_dir=runs/candidates --workdir=runs/calibrate
  python experiments/evaluate.py --config=experiments/configs/slic.py \
      --model_workdirs=fine-tuned=runs/mle,calibrated=runs/calibrate --workdir=runs/eval
"""

import importlib.util
import os

import ml_collections

from slicjax import optim
from slicjax.pipelines import calibrate, candidates, evaluate


def _mle_config():
  # Config files are loaded by path (not as a package), so load the sibling by path too.
  spec = importlib.util.spec_from_file_location(
    "slicjax_mle_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "mle.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _mle_config()
  c.candidates = ml_collections.ConfigDict(dict(candidates.CANDIDATE_KEYS))
  c.calibrate = ml_collections.ConfigDict(dict(calibrate.CALIBRATE_KEYS))
  c.optimizer = ml_collections.ConfigDict({**optim.DEFAULTS, **dict(
    learning_rate=3e-4, warmup_steps=10, schedule="constant", decay_steps=0)})
  c.evaluate = ml_collections.ConfigDict(dict(evaluate.EVAL_KEYS))
  # JAX persistent compilation cache: "default" (~/.cache/slicjax/jax_compilation or
  # $SLICJAX_CACHE_DIR/jax_compilation), a directory, or "off".
  c.compilation_cache = "default"
  return c
