"""The synthetic-gold preference study over seeds: one synthetic-gold experiment per seed, then
the seeds pooled into docs/results/preference_effect.json and a markdown table with 95%
bootstrap intervals (slicjax.pipelines.preference_study).

  python experiments/preference_study.py --experiment=default --seeds=0,1,2 \
      --set="experiment.losses=('sigmoid_norm',)" --workdir=runs/pref_study
  # seeds in parallel: run --seeds=0, --seeds=1, ... separately, then pool with
  python experiments/preference_study.py --experiment=default --seeds=0,1,2 --aggregate_only \
      --workdir=runs/pref_study

A seed whose results.json exists is not run again.
"""

import os
import shlex
import sys

from absl import flags

from slicjax import cli, config_help
from slicjax.pipelines import gold_experiment, preference_study

_WORKDIR = flags.DEFINE_string("workdir", None, "One seed_<n>/ subdirectory per seed.")
_EXPERIMENT = flags.DEFINE_enum("experiment", "default", sorted(gold_experiment.EXPERIMENT_PRESETS),
                                "Synthetic-gold experiment preset.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (every stage's seed is set to it).")
_SET = flags.DEFINE_multi_string("set", [], "Override one experiment config key, e.g. "
                                 "--set=preference.steps=100 (a Python literal). Repeatable.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "Split the policies "
                           "are judged on (another split reuses the trained stages).")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Only pool finished seeds.")
_NAME = flags.DEFINE_string("model_name", "small from scratch", "The start model's name in the "
                            "outputs.")
_OUT_JSON = flags.DEFINE_string("out_json", "docs/results/preference_effect.json",
                                "Effect summary (merged per start model).")
_REPLACE = flags.DEFINE_bool("replace_entry", False, "Replace the start model's entry in "
                             "--out_json even if it pools seeds this run lacks.")
_OUT_MD = flags.DEFINE_string("out_md", "", "Markdown table (default <workdir>/study.md).")


def main(argv):
  del argv
  overrides = cli.parse_overrides(_SET.value)
  seeds = [int(s) for s in _SEEDS.value]
  dirs = {}
  for s in seeds:
    if _AGGREGATE_ONLY.value:
      dirs[s] = os.path.join(_WORKDIR.value, f"seed_{s}")
    else:
      dirs[s] = preference_study.run_seed(_EXPERIMENT.value, overrides, _WORKDIR.value, s,
                                          _SPLIT.value)
  agg = preference_study.aggregate(dirs, split=_SPLIT.value)
  command = " ".join(["python experiments/preference_study.py"]
                     + [shlex.quote(a) for a in sys.argv[1:] if a != "--aggregate_only"])
  preference_study.write_effect(_OUT_JSON.value, _NAME.value, agg, command,
                                replace=_REPLACE.value)
  text = preference_study.markdown(_NAME.value, agg, command)
  md = _OUT_MD.value or os.path.join(_WORKDIR.value, f"study_{_SPLIT.value}.md")
  with open(md, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {_OUT_JSON.value} and {md}")


def _describe():
  return config_help.describe(gold_experiment.experiment_config(_EXPERIMENT.value),
                              title=f"Config of --experiment={_EXPERIMENT.value} (override with "
                              "--set=section.key=value):", prefix="--set=")


if __name__ == "__main__":
  cli.run(main, describe=_describe, required=["workdir"])
