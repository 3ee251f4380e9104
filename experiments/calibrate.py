"""Continue training a fine-tuned checkpoint on L_cal + λ·L_reg (SLiC step 3).

  python experiments/calibrate.py --config=experiments/configs/slic.py \
      --config.calibrate.finetuned_workdir=runs/mle \
      --config.calibrate.candidates_dir=runs/candidates --workdir=runs/calibrate
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import calibrate

_CONFIG = cli.define_config_file("config", "experiments/configs/slic.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  calibrate.run(_CONFIG.value, _WORKDIR.value)  # SIGTERM: checkpoint, exit 75 (slicjax.cli)


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
