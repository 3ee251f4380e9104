"""Preference optimization of the SFT policy (DPO / sigmoid-norm, hinge, hinge-norm, IPO,
SLiC-HF) on direct, sft-sample-rank or rso-sample-rank pairs; or, with --experiment, the
synthetic-gold experiment comparing them.

  python experiments/train_preference.py --config=experiments/configs/preference.py \
      --config.preference.sft_workdir=runs/mle --config.preference.loss=hinge \
      --config.preference.pair_source=rso-sample-rank --config.preference.pairs=runs/pairs_rso \
      --workdir=runs/hinge_rso
  python experiments/train_preference.py --experiment=smoke --workdir=runs/gold_smoke
  python experiments/train_preference.py --experiment=default --reward_only \
      --set=human.num_samples=4 --set=reward.eval_every=25 --workdir=runs/gold_rm
"""

from absl import flags

from slicjax import cli, config_help, distributed
from slicjax.pipelines import gold_experiment, preference

_CONFIG = cli.define_config_file("config", "experiments/configs/preference.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summaries.")
_EXPERIMENT = flags.DEFINE_enum(
  "experiment",
  None,
  sorted(gold_experiment.EXPERIMENT_PRESETS),
  "Run the synthetic-gold experiment with this preset instead (--config is then unused).",
)
_SET = flags.DEFINE_multi_string(
  "set", [], "--experiment only: override one experiment config key, e.g. --set=reward.steps=200 "
  "(the value is a Python literal; a bare word is a string). Repeatable."
)
_REWARD_ONLY = flags.DEFINE_bool(
  "reward_only", False, "--experiment only: stop after the proxy reward model (SFT, 'human' "
  "pairs, reward model) and write reward_report.md."
)
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  if _EXPERIMENT.value:
    out = gold_experiment.synthetic_gold_experiment(
      cli.parse_overrides(_SET.value) or None, _WORKDIR.value, _EXPERIMENT.value,
      reward_only=_REWARD_ONLY.value,
    )
    print(f"report: {out['report']}")
    return
  if _SET.value or _REWARD_ONLY.value:
    raise ValueError("--set and --reward_only apply to --experiment; for a preference job use "
                     "--config.<section>.<key>=value.")
  # SIGTERM: checkpoint, exit 75 (slicjax.cli)
  _, summary = preference.train_preference(_CONFIG.value, _WORKDIR.value)
  b, a = summary["before"], summary["after"]
  print(
    f"{summary['loss']} on {summary['num_pairs']} {summary['pair_source']} pairs: "
    f"pair accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, "
    f"DPO loss {b['dpo_loss']:.4f} -> {a['dpo_loss']:.4f}"
  )


def _describe():
  if _EXPERIMENT.value:
    return config_help.describe(
      gold_experiment.experiment_config(_EXPERIMENT.value),
      title=f"Config of --experiment={_EXPERIMENT.value} (override with --set=section.key=value):",
      prefix="--set=",
    )
  return cli.help_text(config=_CONFIG)


if __name__ == "__main__":
  cli.run(main, describe=_describe, required=["workdir"], resumable_on_sigterm=True)
