"""The SLiC study: fine-tune once, sweep calibration recipes on validation, compare the chosen
recipe with the fine-tuned model on test (see slicjax/pipelines/slic_study.py).

  python experiments/slic_study.py --workdir=runs/study --study=small_stdlib
      [--results_dir=docs/results] [--datasets=stdlib_docstrings]

Rerunning the same command resumes: finished stages and cells are skipped.
"""

from absl import flags

from slicjax import cli
from slicjax.pipelines import slic_study

_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Where every stage's output goes.")
_STUDY = flags.DEFINE_enum("study", "smoke", sorted(slic_study.STUDIES), "The study to run.")
_RESULTS = flags.DEFINE_string(
  "results_dir", "docs/results", "Where slic_study.md and slic_effect.json are written (other "
  "studies' sections and other (dataset, model) entries there are kept)."
)
_DATASETS = flags.DEFINE_list("datasets", [], "Only these of the study's datasets.")


def _describe() -> str:
  study = slic_study.STUDIES[_STUDY.value]
  lines = [f"Study {study.name}: {study.description}", f"  preset: {study.preset}",
           f"  datasets: {', '.join(study.datasets)}", f"  model: {study.model}",
           f"  overrides: {study.overrides}", "  cells:"]
  lines += [f"    {name}: {slic_study.recipe_slug(r)}" for name, r in slic_study.cells(study)]
  return "\n".join(lines)


def main(argv):
  del argv
  slic_study.run(_STUDY.value, _WORKDIR.value, _RESULTS.value,
                 datasets=tuple(_DATASETS.value) or None)


if __name__ == "__main__":
  cli.run(main, describe=_describe, resumable_on_sigterm=True)
