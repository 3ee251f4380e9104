"""Plots: a training curve with one or two logged points is still visible."""

import numpy as np

from slicjax.evaluation import plots


def _series_pixels(path) -> int:
  import matplotlib.image as mpimg

  img = mpimg.imread(path)[..., :3]
  c0 = np.array([0x1F, 0x77, 0xB4]) / 255.0  # matplotlib's first series colour
  return int((np.abs(img - c0).max(-1) < 0.08).sum())


def test_single_point_training_curve_is_drawn(tmp_path):
  one = plots.training_curves({"MLE loss": [(20, 3.1)]}, str(tmp_path / "one.png"))
  empty = plots.training_curves({"MLE loss": []}, str(tmp_path / "empty.png"))
  assert _series_pixels(empty) == 0
  # Without a marker only the legend swatch is drawn (27 pixels); with it, 110.
  assert _series_pixels(one) > 60
  many = plots.training_curves({"MLE loss": [(i, 1.0 / (i + 1)) for i in range(100)]},
                               str(tmp_path / "many.png"))
  assert _series_pixels(many) > _series_pixels(one)


def test_importing_plots_keeps_the_callers_matplotlib_backend():
  import subprocess
  import sys

  code = ("import matplotlib; matplotlib.use('svg'); from slicjax.evaluation import plots; "
          "plots.training_curves({'x': [(1, 1.0)]}, '/dev/null'); "
          "print(matplotlib.get_backend())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "svg"  # a notebook's inline backend survives a report
