"""Sample N outputs per prompt from the SFT policy, reward them, keep M by statistical rejection
sampling (RSO; or the first M with rso.mode=sft) and write ranked preference pairs with their
reference log-probs. Resumable: rerun the same command after an interruption.

  python experiments/rso_sample.py --config=experiments/configs/preference.py \
      --config.rso.sft_workdir=runs/mle --config.rso.reward_workdir=runs/reward \
      --config.rso.num_samples=64 --config.rso.num_accept=8 --config.rso.beta=0.5 \
      --workdir=runs/pairs_rso
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import common, rso

_CONFIG = cli.define_config_file("config", "experiments/configs/preference.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the pair chunks.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  common.log_devices()
  out = rso.rso_sample(_CONFIG.value, common.prepare_workdir(_WORKDIR.value, _CONFIG.value))
  print(f"pairs written to {out}")


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
