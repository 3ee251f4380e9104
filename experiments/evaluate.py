"""Quality vs beam size, repetition and likelihood-quality calibration for trained models.

  python experiments/evaluate.py --config=experiments/configs/slic.py \
      --model_workdirs=fine-tuned=runs/mle,calibrated=runs/calibrate --workdir=runs/eval
"""

from absl import app, flags

from slicjax import cli, distributed
from slicjax.pipelines import common, evaluate, tasks

_CONFIG = cli.define_config_file("config", "experiments/configs/slic.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "eval.md, eval.json and plots go here.")
_MODELS = flags.DEFINE_list("model_workdirs", None, "name=workdir pairs, the first decodes the "
                            "calibration-report candidates.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  common.log_devices()
  config = _CONFIG.value
  workdirs = {}
  for item in _MODELS.value:
    if "=" not in item:
      raise app.UsageError(f"--model_workdirs expects name=workdir, got {item!r}.")
    name, wd = item.split("=", 1)
    workdirs[name] = wd
  evaluate.validate(config, workdirs)  # before anything loads
  out = common.prepare_workdir(_WORKDIR.value, config)
  models = {
    name: common.params_from(config, wd, "--model_workdirs") for name, wd in workdirs.items()
  }
  data = tasks.load(config, batch_size=config.evaluate.batch_size)
  result = evaluate.run(models, common.model_from(config), data, config, out)
  print(evaluate.markdown_table(result["grid"], result["rank_correlation"],
                               result["paired_differences"]))


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir", "model_workdirs"])
