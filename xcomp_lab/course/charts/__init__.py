"""The course's figures, drawn with matplotlib's object-oriented API; memory axes in GiB (1024**3 bytes), or in
MiB (1024**2) where everything drawn is below 1 GiB, as for the tiny replica (`AxisUnit`).

- `steps_chart`: steps side by side as stacked bars (weights / KV cache / activations), budget, OOM, prediction.
- `timeline_chart`: allocated memory during one captioning call, with its phases and its peak.
- `weight_breakdown` / `format_breakdown` / `weight_breakdown_chart`: where the model's bytes are, by part.
- `quality_memory_chart`: caption quality against peak memory, one point per step.

Each chart returns its Figure and saves a PNG when given `path`. Figures are made with pyplot and closed
at once: pyplot wires up the notebook's inline display, and closing stops it showing the figure a second
time at the end of the cell, so a notebook shows a returned figure exactly once.
"""

from xcomp_lab.course.charts.base import COLORS, AxisUnit, finish, new_axes
from xcomp_lab.course.charts.breakdown import PARTS, format_breakdown, weight_breakdown, weight_breakdown_chart
from xcomp_lab.course.charts.quality import quality_memory_chart
from xcomp_lab.course.charts.steps import steps_chart
from xcomp_lab.course.charts.timeline import timeline_chart

__all__ = ["COLORS", "AxisUnit", "PARTS", "finish", "new_axes", "steps_chart", "timeline_chart", "weight_breakdown",
           "format_breakdown", "weight_breakdown_chart", "quality_memory_chart"]
