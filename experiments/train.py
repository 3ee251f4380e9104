"""MLE fine-tuning binary.

  python experiments/train.py --config=experiments/configs/mle.py --workdir=runs/mle
"""

from absl import app, flags, logging
from ml_collections import config_flags

from slicjax import distributed, training
from slicjax.pipelines import mle

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/mle.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  try:
    mle.run(_CONFIG.value, _WORKDIR.value)
  except training.Preempted as e:  # SIGTERM: checkpoint written; exit cleanly, rerun resumes
    logging.warning("%s", e)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
