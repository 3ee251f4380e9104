"""Train a reward model (pointwise Bradley-Terry or pairwise text-to-text ranker) on preference
pairs and report held-out pair accuracy.

  python experiments/train_reward.py --config=experiments/configs/preference.py \
      --config.reward.kind=ranker --config.reward.pairs=runs/pairs_direct \
      --config.reward.init_from=runs/mle --workdir=runs/reward
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import reward

_CONFIG = cli.define_config_file("config", "experiments/configs/preference.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reward_eval.json.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  _, report = reward.train_reward(_CONFIG.value, _WORKDIR.value)  # SIGTERM: exit 75 (cli)
  print(
    f"held-out pair accuracy: {report['heldout_accuracy']:.4f} "
    f"({report['heldout_pairs']} pairs; train {report['train_accuracy']:.4f})"
  )


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
