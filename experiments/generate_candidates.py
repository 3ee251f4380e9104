"""Decode and score m candidates per training example (SLiC steps 1-2); resumable.

  python experiments/generate_candidates.py --config=experiments/configs/slic.py \
      --config.candidates.finetuned_workdir=runs/mle --workdir=runs/candidates
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import candidates, common

_CONFIG = cli.define_config_file("config", "experiments/configs/slic.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for candidate chunks.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  common.log_devices()
  out = candidates.generate(_CONFIG.value, common.prepare_workdir(_WORKDIR.value, _CONFIG.value))
  print(f"candidates written to {out}")


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
