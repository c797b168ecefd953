# %% [markdown]
# # 08 · Planner and summary: every fix side by side, and which card each configuration fits
#
# Each notebook appended its measurements to one results file. Here they come back together: memory per step
# against the budget, what the estimator predicted for each, quality next to memory, and a planner that predicts
# the peak of a configuration on a card you name, before you load anything.

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
# same step made now, without loading anything. With the original's own checkpoint the estimator is the original's
# (`xcomp_lab.original.estimate.estimate_original`: its `model.chat` replayed on fake tensors, on this device's
# terms) and each line also names the phase of the peak, measured and predicted; steps it cannot replay say why. For a step that ran out of memory the measured figure is where the
# call stopped, not its peak: what to compare there is whether the estimator predicted the OOM too.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.course.results import latest_by_step, read_results
from xcomp_lab.core.units import fmt_bytes

if params.original_code:  # the original's own steps (xcomp_lab.original.steps), not the replica's
    from xcomp_lab.original.steps import ORIGINAL_STEPS as step_table
else:
    from xcomp_lab.course.steps import STEPS as step_table

measured = latest_by_step(read_results(params.results_path)) if params.results_path.exists() else {}
course = [dict(measured[name], predicted_peak_bytes=None, predicted_oom=None) for name in step_table
          if measured.get(name, {}).get("peak_bytes") is not None]  # every step of the table that ran
if params.original_code:  # the original's own estimator: its model.chat replayed on fake tensors
    import tempfile

    from xcomp_lab.course.notebook import batch_of_images
    from xcomp_lab.lessons.planner import predict_original_steps

    with tempfile.TemporaryDirectory(prefix="xcomp-lab-08-") as folder:
        image_file = f"{folder}/image.png"
        batch_of_images(params)[0].save(image_file)
        # Each replay of the full model takes minutes on one core: at full size, FP32 without autocast (the call
        # DESIGN.md section 6 traces to decode step 1) and FP16 at load (notebook 07's call).
        chosen = None if params.scale == "small" else ("fp32-no-autocast", "fp16")
        predictions = predict_original_steps({r["step"]: r for r in course}, params.model_name_or_path,
                                             scale=params.scale, device=params.device, image=image_file,
                                             max_new_tokens=params.max_new_tokens, names=chosen)
    for r in course:
        p = predictions[r["step"]]
        status = "OOM " if r["oom"] else "fits"
        if p.peak_bytes is None:
            print(f"{r['step']:20s} {status} | measured {fmt_bytes(r['peak_bytes']):>10} | no estimate: {p.reason}")
            continue
        r["predicted_peak_bytes"], r["predicted_oom"] = p.peak_bytes, p.oom
        phase = (r.get("extra") or {}).get("peak_phase")
        print(f"{r['step']:20s} {status} | measured {fmt_bytes(r['peak_bytes']):>10} in {phase} | predicted "
              f"{fmt_bytes(p.peak_bytes):>10} in {p.peak_phase} ({'OOM' if p.oom else 'fits'}) | "
              f"x{r['peak_bytes'] / p.peak_bytes:.4f} | replayed in {p.seconds:.0f} s")
else:  # the replica's estimator
    from xcomp_lab.estimate import estimate_step

    for r in course:
        predicted = estimate_step(step_table[r["step"]], params)
        r["predicted_peak_bytes"], r["predicted_oom"] = predicted.peak_bytes, predicted.oom
        status = "OOM " if r["oom"] else "fits"
        print(f"{r['step']:20s} {status} | measured {fmt_bytes(r['peak_bytes']):>10} | predicted "
              f"{fmt_bytes(r['predicted_peak_bytes']):>10} ({'OOM' if predicted.oom else 'fits'}) | "
              f"x{r['peak_bytes'] / r['predicted_peak_bytes']:.2f}")
if not course:
    print(f"No course results in {params.results_path} yet: run notebooks 01-07 first (`make course` runs them "
          f"in order); the planner below works without them.")

# %% [markdown]
# How close were the predictions? The largest gap on the predicted steps that fitted, and the verdict on those that
# did not; then the budget the records were measured under, against the budget the course's card of `budget_gb` gives
# now.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.memory.budget import card_bytes, card_limit_bytes

if not params.original_code:  # the replica's parameter count (the original's budget comes from its own rule)
    from xcomp_lab.model.inventory import parameter_count

fitted = [r for r in course if not r["oom"]]
errors = [(abs(r["peak_bytes"] / r["predicted_peak_bytes"] - 1), r["step"]) for r in fitted
          if r["predicted_peak_bytes"] is not None]
if course:
    line = f"Course steps measured: {len(course)}, {len(fitted)} of them fitted"
    if errors:
        worst = max(errors)
        line += (f"; the estimator predicted {len(errors)} of those {len(fitted)}, its largest error {worst[0]:.1%} "
                 f"({worst[1]})")
    print(line + ".")
for r in course:
    if r["oom"]:
        verdict = ("not predicted here" if r["predicted_oom"] is None else
                   "the estimator predicted " + ("an OOM too" if r["predicted_oom"] else "that it fits: they disagree"))
        print(f"{r['step']} ran out of memory; {verdict}.")
if params.original_code:
    from xcomp_lab.course.steps import course_budget

    card_budget = course_budget(params, None).limit_bytes
else:
    card_budget = card_limit_bytes(params.budget_gb, params.device, parameter_count(params.scale) * 4)
recorded_budgets = sorted({r["budget_bytes"] for r in course if r["budget_bytes"] is not None})
print(f"budget_gb={params.budget_gb:g}: {card_bytes(params.budget_gb)[1]}; on {params.device} at this scale "
      f"{fmt_bytes(card_budget)}.")
if recorded_budgets:
    same = recorded_budgets == [card_budget]
    print(f"Budget in the records: {', '.join(fmt_bytes(b) for b in recorded_budgets)}: "
          + ("the same card." if same else "not this card's (the records were made under another card or rule): "
                                           "read their verdicts against the budget they name, not this one."))

# %% [markdown]
# ## Step 2: every step against the budget, and quality against memory
#
# One bar per step: weights, KV cache and activations stacked, the budget as a dashed line, the estimator's
# prediction as a hollow diamond; a step that ran out of memory is hatched red up to where it stopped. Quality
# (exact match of the captions, where notebooks 02 and 06 scored them) is written above a bar only where the
# weights are trained: at `scale="full"` the replica's weights are random and its captions noise.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.course.charts import quality_memory_chart, steps_chart

charts = params.results_path.parent
budget_bytes = course[0]["budget_bytes"] if course else None
quality_key = None if params.random_weights else "exact_match"
steps_figure = None
if course:
    steps_figure = steps_chart(course, budget_bytes=budget_bytes, quality_key=quality_key, path=charts / "steps.png",
                               title=f"Every step under the {params.budget_gb:g} GB budget ({params.scale}, "
                                     f"{params.device})")
else:
    print("No course results to draw.")
steps_figure

# %% [markdown]
# The bars read against one another: how far each step's peak lies below the budget, how much of it is weights,
# and where the diamond (the prediction) sits against the bar (the measurement). The same peaks as a share of the
# FP32 caption's, with the captions' exact match where this run has one:

# %% tags=["nbval-ignore-output"]
reference = next((r for r in course if r["step"] == "fp32-no-autocast"), None)
scored = [r for r in course if not r["oom"] and "exact_match" in (r.get("extra") or {})]
for r in course:
    if r["oom"]:
        continue
    share = f"{r['peak_bytes'] / reference['peak_bytes']:5.0%} of FP32's" if reference else ""
    quality = (f" | exact match {r['extra']['exact_match']:.0%} of {r['extra'].get('n', '?')} scenes"
               if quality_key and r in scored else "")
    print(f"{r['step']:20s} peak {fmt_bytes(r['peak_bytes']):>10} {share}{quality}")
if params.random_weights:
    print("Random weights at this scale: the captions' exact match is noise, so quality is not shown; the tiny "
          "scale's trained captioner (or real weights) gives the quality side.")

# %% tags=["nbval-ignore-output"]
quality_figure = None
if scored and quality_key:
    quality_figure = quality_memory_chart(scored, budget_bytes=budget_bytes, quality_key=quality_key,
                                          path=charts / "quality-vs-memory.png",
                                          title="Caption quality against peak memory")
elif quality_key:
    print("No step has a caption-quality figure yet: notebooks 02 and 06 score the captions of each precision.")
quality_figure

# %% [markdown]
# Each point is one step: further left is less memory, higher is better captions. A point left of another at the
# same height saved memory for no loss of quality that this run could see: with as few scenes per step as the
# lines above count, a caption or two apart is within what the sample can tell.
#
# **Exercise 8.1: predict, then ask the planner.** How many images can FP16 caption at once on the course's card
# of this notebook's `budget_gb` (Step 1 names it), at its image size, new tokens and attention? Predict the
# largest batch that fits, a whole number of images: Step 1's FP16 peak and notebook 04's batch runs are your
# evidence. Write it into `my_largest_batch`; in Step 4 the planner searches for the answer, and
# `answer_8_1.solution()` shows the worked reasoning.

# %%
my_largest_batch = None  # your prediction, in images

# %% [markdown]
# ## Step 3: the card in this machine, in plain PyTorch
#
# A card's budget is what PyTorch sees on it less the CUDA context (notebook 00). On a GPU two calls read the
# first: `torch.cuda.get_device_properties(0).total_memory` (fixed) and `torch.cuda.mem_get_info()` (free and
# total right now; what is in use includes this process's CUDA context and any other process).

# %% tags=["nbval-ignore-output"]
import torch

if params.device == "cuda":
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"{props.name}: total_memory {fmt_bytes(props.total_memory)} | mem_get_info: {fmt_bytes(free)} free of "
          f"{fmt_bytes(total)}")
else:
    print(f"device={params.device}: no GPU here, so no torch.cuda.mem_get_info(); the planner offers the "
          f"catalogue's cards only")

# %% [markdown]
# `machine_card()` wraps the first call: on a machine with a GPU the planner lists that card first, budgeted like
# every other card.
#
# ## Step 4: the planner
#
# The planner predicts the course's replica (its estimator, `estimate.estimate_caption`); with the original's own
# checkpoint its cells are skipped (`if not params.original_code`): Step 1 predicted the original's steps with the
# original's own estimator.
#
# `plan()` predicts one configuration on one card: by name (`card="L4"`, any card of `xcomp_lab.memory.cards`),
# by marketed size (`plan(24)`: the course's card of that class) or this machine's (`card=machine_card()`).
# `planner()` wraps it in widgets (in JupyterLab: change a control, press *Predict*). At `scale="tiny"` each card
# is scaled to the tiny model as the course's CPU budget is; set `scale="full"` to plan for the real 7B-VL model.
# Cards sold with the same size differ in what PyTorch sees: FP16 on each 24 GB card of the catalogue, then FP32
# on the course's 24 GB card and NF4 on its 16 GB card.

# %%
if not params.original_code:  # the planner predicts the replica
    from xcomp_lab.lessons.planner import plan, planner
    from xcomp_lab.memory.cards import cards_of_class

    setting = dict(scale=params.scale, device=params.device, new_tokens=params.max_new_tokens)
    class_24 = [plan(card=card, dtype="float16", **setting) for card in cards_of_class(24)]
    examples = class_24 + [plan(24, dtype="float32", **setting), plan(16, dtype="float16", quantization="nf4", **setting)]
    for result in examples:
        print(result.line())

# %% [markdown]
# What separates the 24 GB cards, computed from the lines above:

# %%
if not params.original_code:  # the planner predicts the replica
    spare = {r.card.name: r.budget_bytes - r.estimate.peak_bytes for r in class_24}
    tightest, roomiest = min(spare, key=spare.get), max(spare, key=spare.get)
    print(f"FP16 fits {sum(r.fits for r in class_24)} of the {len(class_24)} 24 GB cards; spare from "
          f"{fmt_bytes(spare[tightest])} ({tightest}) to {fmt_bytes(spare[roomiest])} ({roomiest}), "
          f"{fmt_bytes(spare[roomiest] - spare[tightest])} apart for the same marketed size.")

# %%
if not params.original_code:  # the planner predicts the replica
    from xcomp_lab.course.exercises import check
    from xcomp_lab.lessons.planner import largest_batch

    batch_search = largest_batch(params, dtype="float16")

# %%
if not params.original_code:  # the planner predicts the replica
    answer_8_1 = check("8.1", my_largest_batch, measured=batch_search.largest, lower_bound=batch_search.capped,
                       source="planner", peaks=batch_search.peaks, budget_bytes=batch_search.budget_bytes,
                       card=batch_search.card.name)

# %% tags=["nbval-ignore-output"]
from IPython.display import display

if not params.original_code:  # the planner predicts the replica; display() shows a widget made inside a block
    display(planner(scale=params.scale, device=params.device, card_gb=params.budget_gb))

# %% [markdown]
# ## What we learned

# %% tags=["nbval-ignore-output"]
by_name = {r["step"]: r for r in course}
if "fp32-quickstart" in by_name:
    quick = by_name["fp32-quickstart"]
    line = (f"- The FP32 quick start {'ran out of memory' if quick['oom'] else 'fitted'} under the "
            f"{fmt_bytes(quick['budget_bytes'])} budget")
    if "fp32-no-autocast" in by_name:
        plain = by_name["fp32-no-autocast"]
        line += (f"; without autocast FP32 {'ran out too' if plain['oom'] else 'fitted'} "
                 f"(peak {fmt_bytes(plain['peak_bytes'])})")
    print(line + ".")
if "fp32-no-autocast" in by_name and "nf4" in by_name:
    fp32, nf4 = by_name["fp32-no-autocast"], by_name["nf4"]
    print(f"- Weights: FP32 {fmt_bytes(fp32['weights_bytes'])}, NF4 {fmt_bytes(nf4['weights_bytes'])} "
          f"({fp32['weights_bytes'] / nf4['weights_bytes']:.1f}x smaller).")
if errors:
    print(f"- The estimator's largest error on the {len(errors)} predicted step(s) that fitted: {worst[0]:.1%} "
          f"({worst[1]}).")
if not params.original_code:
    print(f"- On the {batch_search.card.name}, the planner fits {batch_search.largest}"
          f"{' or more' if batch_search.capped else ''} FP16 image(s) at once; across the 24 GB class the spare memory "
          f"for one image differs by {fmt_bytes(spare[roomiest] - spare[tightest])}.")
else:
    phases = {r["step"]: (r.get("extra") or {}).get("peak_phase") for r in course}
    print(f"- Where the original's peaks fell in this run, measured: {phases}.")

# %% [markdown]
# **Questions.** (1) Which single change saves the most memory for the least quality, and can the full-scale
# edition answer the quality half? (2) On each 24 GB card of the planner's list, what is the largest batch of
# 490 px images the planner says FP16 can caption, and why can cards sold with the same size disagree? (3) Where
# would the estimator be wrong on a real GPU (think of what the allocator keeps that tensors do not)?
