"""MLE fine-tuning binary.

  python experiments/train.py --config=experiments/configs/mle.py --workdir=runs/mle
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import mle

_CONFIG = cli.define_config_file("config", "experiments/configs/mle.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  mle.run(_CONFIG.value, _WORKDIR.value)  # SIGTERM: checkpoint, exit 75 (slicjax.cli)


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
