"""Continue training a fine-tuned checkpoint on L_cal + λ·L_reg (SLiC step 3).

  python experiments/calibrate.py --config=experiments/configs/slic.py \
      --config.calibrate.finetuned_workdir=runs/mle \
      --config.calibrate.candidates_dir=runs/candidates --workdir=runs/calibrate
"""

from absl import app, flags, logging
from ml_collections import config_flags

from slicjax import distributed, training
from slicjax.pipelines import calibrate

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/slic.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  try:
    calibrate.run(_CONFIG.value, _WORKDIR.value)
  except training.Preempted as e:  # SIGTERM: checkpoint written; exit cleanly, rerun resumes
    logging.warning("%s", e)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
