"""Plots for reports. Figures are made with matplotlib's object API (``Figure``, not pyplot),
so they render headless and never change the backend of the process that imports this (a
notebook keeps showing its own ``plt.show()`` plots)."""

from __future__ import annotations

from matplotlib import colormaps
from matplotlib.figure import Figure


def _subplots(figsize):
  fig = Figure(figsize=figsize, dpi=120)
  return fig, fig.subplots()


def quality_vs_beam(rows, path: str, metric: str = "rougeL"):
  """Quality vs beam size, one line per (model, length penalty); log2 x axis. A model keeps
  one color; α = 0 is solid, α > 0 dashed. The legend sits outside the axes."""
  fig, ax = _subplots((7.6, 4.2))
  keys = sorted({(r["model"], r["alpha"]) for r in rows})
  models = list(dict.fromkeys(k[0] for k in keys))
  colors = {m: colormaps["tab10"](i % 10) for i, m in enumerate(models)}
  greedy = {r["model"]: r for r in rows if r["beam"] == 1}
  for model, alpha in keys:
    pts = sorted((r["beam"], r[metric]) for r in rows
                 if r["model"] == model and r["alpha"] == alpha and r["beam"] > 1)
    if model in greedy:
      pts = [(1, greedy[model][metric])] + pts
    style = "-" if alpha == 0 else "--"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colors[model],
            label=f"{model}, α={alpha:g}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("beam size")
  ax.set_ylabel(f"{metric} (F × 100)")
  ax.set_title("Quality vs beam size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path)
  return path


def training_curves(series: dict[str, list[tuple[int, float]]], path: str, ylabel: str = "loss"):
  """One line per named series of ``(step, value)``; short series (<= 30 points) get markers,
  so a run logged once or twice still shows its points."""
  fig, ax = _subplots((6.4, 4.2))
  for name, pts in series.items():
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
              marker="o" if len(pts) <= 30 else None, markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  return path


def coverage_quality(curves: dict[str, dict[str, dict]], path: str, ylabel: str = "ROUGE-L"):
  """Selective generation: mean quality of the kept outputs vs the fraction kept, one line per
  (model, confidence score). ``curves[model][score] = {"coverage": [...], "quality": [...],
  "area": a}``. A score keeps one color; each model has its own line style; a dotted grey line
  per model marks its mean quality (what abstaining at random gives)."""
  fig, ax = _subplots((7.6, 4.4))
  scores = list(dict.fromkeys(s for per in curves.values() for s in per))
  colors = {s: colormaps["tab10"](i % 10) for i, s in enumerate(scores)}
  styles = ["-", "--", ":", "-."]
  for m_i, (model, per) in enumerate(curves.items()):
    style = styles[m_i % len(styles)]
    for score, c in per.items():
      ax.plot(c["coverage"], c["quality"], style, color=colors[score],
              label=f"{model}: {score} (area {c['area']:.2f})")
    if per:
      last = next(iter(per.values()))
      ax.axhline(last["quality"][-1], color="grey", lw=0.8, ls=":", alpha=0.7)
  ax.set_xlabel("coverage (fraction of outputs kept, most confident first)")
  ax.set_ylabel(f"mean {ylabel} of kept outputs")
  ax.set_title("Selective generation: coverage vs quality")
  ax.set_xlim(0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path)
  return path
