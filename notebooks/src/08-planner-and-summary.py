# %% [markdown]
# # 08 · Planner and summary: every fix side by side, and a planner for your own card
#
# Each notebook appended its measurements to one results file. Here they come back together: memory per step
# against the budget, what the estimator predicted for each, quality next to memory, and a planner that
# predicts the peak of a configuration before you load anything.

# %% tags=["parameters"]
scale = "tiny"
device = "auto"
budget_gb = 48
model_name_or_path = None
batch_size = 1
image_size = None
max_new_tokens = 16
attn_implementation = "eager"
seed = 0
results_path = "results/results.jsonl"

# %% tags=["nbval-ignore-output"]
from xcomp_lab.course.notebook import start

params = start(scale=scale, device=device, budget_gb=budget_gb, model_name_or_path=model_name_or_path,
               batch_size=batch_size, image_size=image_size, max_new_tokens=max_new_tokens,
               attn_implementation=attn_implementation, seed=seed, results_path=results_path)
print(params)

# %% [markdown]
# ## Step 1: read back what the course measured
#
# The last record of each course step (notebooks 01 to 06 wrote them), with the estimator's prediction for the
# same step made now, without loading anything.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.estimate import estimate_step
from xcomp_lab.course.results import latest_by_step, read_results
from xcomp_lab.course.steps import STEPS
from xcomp_lab.core.units import fmt_bytes

measured = latest_by_step(read_results(params.results_path)) if params.results_path.exists() else {}
course = []
for name, step in STEPS.items():
    if name not in measured:
        continue
    r = dict(measured[name])
    r["predicted_peak_bytes"] = estimate_step(step, params).peak_bytes
    course.append(r)
    status = "OOM " if r["oom"] else "fits"
    print(f"{name:20s} {status} | measured {fmt_bytes(r['peak_bytes']):>10} | predicted "
          f"{fmt_bytes(r['predicted_peak_bytes']):>10} | x{r['peak_bytes'] / r['predicted_peak_bytes']:.2f}")
if not course:
    print(f"No course results in {params.results_path} yet: run notebooks 01-07 first (`make course` runs them "
          f"in order); the planner below works without them.")

# %% [markdown]
# For steps that ran out of memory the measured figure is where the call stopped, not its peak. For the rest,
# measurement and prediction agree closely because the estimator replays the very same computation on fake
# tensors and counts it the same way.

# %% tags=["nbval-ignore-output"]
from pathlib import Path

from xcomp_lab.course.charts import quality_memory_chart, steps_chart

charts = params.results_path.parent
budget_bytes = course[0]["budget_bytes"] if course else None
if course:
    steps_chart(course, budget_bytes=budget_bytes, path=charts / "steps.png",
                title=f"Every step under a {params.budget_gb:g} GB budget ({params.scale}, {params.device})")

# %% tags=["nbval-ignore-output"]
scored = [r for r in course if not r["oom"] and "exact_match" in (r.get("extra") or {})]
if scored:
    quality_memory_chart(scored, budget_bytes=budget_bytes, quality_key="exact_match",
                         path=charts / "quality-vs-memory.png", title="Caption quality against peak memory")
else:
    print("No step has a caption-quality figure yet: notebooks 02 and 06 score the captions of each precision.")

# %% [markdown]
# **Exercise 8.1: predict, then ask the planner.** How many images can FP16 caption at once within this
# notebook's budget (`budget_gb`), at its image size, new tokens and attention? Predict the largest batch that
# fits, a whole number of images: Step 1's FP16 peak and notebook 04's batch runs are your evidence. Write it
# into `my_largest_batch`; after Step 2 the planner searches for the answer, and `answer_8_1.solution()` shows
# the worked reasoning.

# %%
my_largest_batch = None  # your prediction, in images

# %% [markdown]
# ## Step 2: the planner
#
# `plan()` predicts one configuration; `planner()` wraps it in widgets (in JupyterLab: change a control, press
# *Predict*). At `scale="tiny"` the card is scaled to the tiny model as the course's CPU budget is; set
# `scale="full"` to plan for the real 7B-VL model (a few seconds per prediction).

# %%
from xcomp_lab.lessons.planner import plan, plan_chart, planner

for card, dtype, quantization in [(24, "float32", "none"), (24, "float16", "none"), (16, "float16", "nf4")]:
    result = plan(card, dtype=dtype, quantization=quantization, scale=params.scale, device=params.device,
                  new_tokens=params.max_new_tokens)
    print(f"{card} GB card, {dtype} {quantization}: predicted peak {fmt_bytes(result.estimate.peak_bytes)} "
          f"of {fmt_bytes(result.budget_bytes)} -> {'fits' if result.fits else 'does not fit'}")

# %%
from xcomp_lab.course.exercises import check
from xcomp_lab.lessons.planner import largest_batch

batch_search = largest_batch(params, dtype="float16")

# %%
answer_8_1 = check("8.1", my_largest_batch, measured=batch_search.largest, lower_bound=batch_search.capped,
                   source="planner", peaks=batch_search.peaks, budget_bytes=batch_search.budget_bytes)

# %% tags=["nbval-ignore-output"]
planner(scale=params.scale, device=params.device)

# %% [markdown]
# ## What we learned

# %% tags=["nbval-ignore-output"]
by_name = {r["step"]: r for r in course}
if "fp32-quickstart" in by_name and "nf4" in by_name:
    fp32, nf4 = by_name["fp32-no-autocast"], by_name["nf4"]
    print(f"- The FP32 quick start {'ran out of memory' if by_name['fp32-quickstart']['oom'] else 'fitted'} "
          f"under the {params.budget_gb:g} GB budget; dropping autocast alone made FP32 fit.")
    print(f"- Weights: FP32 {fmt_bytes(fp32['weights_bytes'])}, NF4 {fmt_bytes(nf4['weights_bytes'])} "
          f"({fp32['weights_bytes'] / nf4['weights_bytes']:.1f}x smaller).")
fitted = [(abs(r["peak_bytes"] / r["predicted_peak_bytes"] - 1), r["step"]) for r in course if not r["oom"]]
if fitted:
    worst = max(fitted)
    print(f"- The estimator's largest error on a step that fitted: {worst[0]:.1%} ({worst[1]}).")

# %% [markdown]
# **Questions.** (1) Which single change saves the most memory for the least quality? (2) On a 24 GB card,
# what is the largest batch of 490 px images the planner says FP16 can caption? (3) Where would the estimator
# be wrong on a real GPU (think of what the allocator keeps that tensors do not)?
