"""The end-to-end SLiC demo on the embedded stdlib_docstrings task (what `make demo` runs).

  python experiments/demo.py --workdir=runs/demo [--preset=default|long|smoke]
      [--losses=rank,margin,list_rank,expected_reward]
"""

from absl import app, flags

from slicjax import cli, config_help, distributed
from slicjax.pipelines import demo

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the run and report.md go.")
_PRESET = flags.DEFINE_enum("preset", "default", sorted(demo.PRESETS), "Run size.")
_LOSSES = flags.DEFINE_list(
  "losses", [], "Calibration losses to run and compare side by side (default: the preset's one, "
  "rank). Each is calibrated from the same fine-tuned model and candidates."
)
_SET = flags.DEFINE_multi_string(
  "set", [], "Config override as dotted.key=value (e.g. --set=train.steps=300)."
)
distributed.define_flags()


def _parse(items):
  import ast

  out = {}
  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--set expects key=value, got {item!r}.")
    k, v = item.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _overrides():
  overrides = _parse(_SET.value)
  if _LOSSES.value:
    overrides["calibrate_losses"] = ",".join(_LOSSES.value)
  return overrides


def _describe():
  from slicjax.models import factory

  config = demo.build_config(_PRESET.value, _overrides())
  config.model = factory.model_config(**config.model)  # list the unset model keys too
  return config_help.describe(
    config, title=f"Config of --preset={_PRESET.value} (set keys with --set=<key>=<value>):",
    prefix="--set=",
  )


def main(argv):
  del argv
  distributed.initialize_from_flags()
  overrides = _overrides()
  report = demo.run(_WORKDIR.value, _PRESET.value, overrides)
  print(f"\nreport: {report['path']}")


if __name__ == "__main__":
  cli.run(main, describe=_describe)
