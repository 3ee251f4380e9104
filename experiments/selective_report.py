"""Rebuilds the selective-generation report (coverage-quality areas, AUROC, paired
differences, with bootstrap intervals) and its plot from the per-example ``selective.jsonl``
that ``evaluate.py`` writes, without any model:

  python experiments/selective_report.py --selective_jsonl=runs/eval/selective.jsonl \
      --out_dir=runs/eval_selective
"""

import json
import os

from absl import app, flags

from slicjax.pipelines import evaluate

_JSONL = flags.DEFINE_string("selective_jsonl", None, "selective.jsonl written by evaluate.")
_OUT = flags.DEFINE_string("out_dir", None, "selective.md, selective.json and "
                           "coverage_quality.png go here.")
flags.mark_flags_as_required(["selective_jsonl", "out_dir"])


def main(argv):
  del argv
  path = _JSONL.value
  if not os.path.isfile(path):
    raise app.UsageError(f"--selective_jsonl={path} does not exist; give the selective.jsonl "
                         "an evaluate run wrote.")
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  rep = evaluate.selective_from_records(records)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "selective.json"), "w") as f:
    json.dump(rep, f, indent=2)
  text = evaluate.selective_markdown(rep)
  with open(os.path.join(_OUT.value, "selective.md"), "w") as f:
    f.write(text)
  evaluate.selective_plot(rep, os.path.join(_OUT.value, "coverage_quality.png"))
  print(text)


if __name__ == "__main__":
  app.run(main)
