# %% [markdown]
# # 01 · The FP32 quick start runs out of memory on a 48 GB card, and attention is not to blame
#
# The user story: captioning one image with InternLM-XComposer2-VL-7B on a 48 GB GPU died with *CUDA out of
# memory* inside attention, 44.16 GB in use. Here we reproduce that failure on the replica, read the error message
# field by field, record the failing call allocation by allocation to see what filled the memory, and show that
# the kernel survives it.

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
from xcomp_lab.course.notebook import batch_of_images, record, start

params = start(scale=scale, device=device, budget_gb=budget_gb, model_name_or_path=model_name_or_path,
               batch_size=batch_size, image_size=image_size, max_new_tokens=max_new_tokens,
               attn_implementation=attn_implementation, seed=seed, results_path=results_path)
print(params)

# %% [markdown]
# ## Step 1: load in FP32, as the quick start did
#
# The released weights are stored in FP16. Transformers 4.x loaded them as FP32 unless told otherwise; since
# transformers 5, `from_pretrained` keeps the checkpoint's dtype. To reproduce the report we must ask for FP32
# explicitly: `dtype=torch.float32` (changed line).

# %%
import torch
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.core.units import fmt_bytes

step = STEPS["fp32-quickstart"]
print(step.describe())
model, tokenizer = load_for_step(step, params)  # from_pretrained(..., dtype=torch.float32)
fp32_weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"parameters in {model.dtype}: {fmt_bytes(fp32_weights)}")

# %% [markdown]
# ## Step 2: the budget of a 48 GB card
#
# The course emulates the card PyTorch would see (notebook 00: on the 48 GB class, less than 48 GiB, and less
# again once the CUDA context has its share). On a GPU it limits the allocator with
# `torch.cuda.set_per_process_memory_fraction(limit / total_memory)`, so a bigger card behaves like that one and
# raises a real `torch.OutOfMemoryError`. On a CPU every tensor allocation is counted against a budget scaled to
# this model; the line below says how (for the replica as the card is to the full FP32 model; for a small build of
# the original's own code, whose activations are full-size, the card less the FP32 weights the build lacks).

# %%
budget = course_budget(params, model.config)
print(budget.describe())
if params.device == "cuda":  # what the budget sets, in plain PyTorch (run_step applies it and gives it back)
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"torch.cuda.set_per_process_memory_fraction({budget.limit_bytes / total:.4f}): "
          f"{fmt_bytes(budget.limit_bytes)} of this card's {fmt_bytes(total)}")

# %% [markdown]
# ## Step 3: caption as the quick start does
#
# The official example runs `torch.set_grad_enabled(False)`, then `model.chat(...)` inside
# `torch.cuda.amp.autocast()`. Prediction by params x bytes: set the weights of Step 1 against the budget of
# Step 2. First the call itself in plain PyTorch: on a GPU, the budget set, the peak reset, the error caught and
# `torch.cuda.max_memory_allocated()` read; on a CPU the same call inside the course's tensor accounting
# (`memory.measure`), which enforces the budget there.

# %%
import gc

from xcomp_lab.course.notebook import chat_inputs

images = batch_of_images(params)
query = "<ImageHere>Describe the image in one sentence."
chat = chat_inputs(model, images[0], params)  # image (and image_size for the replica), greedy
if params.device == "cuda":
    before_chat = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    budget.apply()  # torch.cuda.set_per_process_memory_fraction(...)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):  # set_grad_enabled(False) + amp.autocast()
            model.chat(tokenizer, query, **chat)
        print("model.chat fitted")
    except torch.OutOfMemoryError as error:
        print(f"model.chat raised torch.OutOfMemoryError: {str(error).split('. GPU')[0]}")
    finally:
        budget.restore()
    gc.collect()  # the error's traceback held the call's tensors
    torch.cuda.empty_cache()
    after_chat = torch.cuda.memory_allocated()
    print(f"peak, torch.cuda.max_memory_allocated(): {fmt_bytes(torch.cuda.max_memory_allocated())} | allocated "
          f"before {fmt_bytes(before_chat)}, after {fmt_bytes(after_chat)}")
else:
    from xcomp_lab.memory import measure

    with measure("cpu", model=model, budget=budget, raise_oom=False) as m:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            model.chat(tokenizer, query, **chat)
    print(f"model.chat {'raised torch.OutOfMemoryError' if m.result.oom else 'fitted'} (CPU tensor accounting); "
          f"peak {fmt_bytes(m.result.peak_bytes)}")

# %% [markdown]
# The course's `run_step` makes the same call (for the replica through `chat()`'s prompt path and a greedy
# `generate`; for the original's own code `model.chat` itself, as the quick start calls it), marks the phases
# (vision, prefill, decode), appends the record to the results file and reports where it failed:

# %%
quickstart, quickstart_record = run_step(step, model, tokenizer, images, params, budget)
record(params, quickstart_record)
print(quickstart.oom_report)

# %% [markdown]
# ## Step 4: read the error, field by field
#
# The message is the first evidence, and it is precise. On a GPU it comes from PyTorch's caching allocator: the one
# allocation that failed, the card's capacity and free memory, what this process holds, the limit that
# `set_per_process_memory_fraction` set, and how much of PyTorch's memory is live tensors against cache. On a CPU
# the course's accounting raises `BudgetExceededError` (a `torch.OutOfMemoryError`) with the fields it knows: the
# op, its output's shape and dtype, the request, what was in use and the budget. `parse_oom_message` reads either
# kind into a small dataclass:

# %%
import textwrap

from xcomp_lab.lessons.oom import parse_oom_message

if quickstart.ok:
    oom = None
    print(f"no error to read: the quick start fitted {budget.card}, its peak {fmt_bytes(quickstart.memory.peak_bytes)}"
          + (" (a larger card than the report's?)" if not params.original_code else ""))
else:
    print(textwrap.fill(quickstart.memory.error, 116), end="\n\n")
    oom = parse_oom_message(quickstart.memory.error)
    print(f"read as: {oom.source}\n")
    print(oom.table())

# %% [markdown]
# The table names each field; the lines under it add them up against the limit. What the message cannot say is
# what the memory already in use was made of: Step 6 records that.

# %% [markdown]
# **Exercise 1.1: predict, then measure.** The quick start runs `model.chat` under autocast inside
# `torch.set_grad_enabled(False)`. Step 5 runs that call without a budget, and the same call inside
# `torch.inference_mode()`. Predict how much higher the quick start's peak is than the inference_mode one, as a
# multiple of the FP32 parameters' bytes printed in Step 1: a plain number, 0 for no difference, 1 for as much
# again as the weights. Write it into `my_autocast_extra_x`; the cell after Step 5 compares it with this run, and
# `answer_1_1.solution()` shows the worked reasoning.

# %%
my_autocast_extra_x = None  # your prediction: extra peak / FP32 parameter bytes

# %% [markdown]
# ## Step 5: why? Measure the same call without a budget
#
# Autocast casts each FP32 weight to FP16 before a matmul and, while the weight requires grad (parameters do,
# even under `no_grad`), keeps the FP16 copy cached until the autocast block ends; inside `inference_mode` it keeps
# none (PyTorch 2.10 and later). `autocast_copy_bytes` adds up the FP16 copies of every linear and convolution
# weight: what the cache holds once every layer has run.

# %%
from xcomp_lab.run.call import autocast_copy_bytes

unbounded, _ = run_step(step, model, tokenizer, images, params, budget=None)
uncached, _ = run_step(STEPS["fp32-inference-mode"], model, tokenizer, images, params, budget=None)
extra = unbounded.memory.peak_bytes - uncached.memory.peak_bytes
copies = autocast_copy_bytes(model)
print(f"autocast under no_grad (quick start), no budget: peak {fmt_bytes(unbounded.memory.peak_bytes)}")
print(f"autocast under inference_mode, no budget:        peak {fmt_bytes(uncached.memory.peak_bytes)}")
print(f"FP16 copies of every linear/conv weight: {fmt_bytes(copies)} = x{copies / fp32_weights:.2f} the FP32 weights")
print(f"difference {fmt_bytes(extra)} = x{extra / fp32_weights:.2f} the FP32 weights "
      f"= x{extra / copies:.2f} the copies")

# %%
from xcomp_lab.course.exercises import check

answer_1_1 = check("1.1", my_autocast_extra_x, measured=extra / fp32_weights, extra_bytes=extra, copies_bytes=copies,
                   weights_bytes=fp32_weights)

# %% [markdown]
# Same computation, same FP16 activations: the two calls differ only in whether autocast keeps its copies. The last
# line above sets the difference against the copies.
#
# ## Step 6: watch the copies pile up: record the failing call
#
# PyTorch's recipe for a memory snapshot ("Understanding CUDA memory usage") takes three calls:
# `torch.cuda.memory._record_memory_history(max_entries=...)` before the code, `torch.cuda.memory._snapshot()` (or
# `_dump_snapshot(path)`) after it, and `_record_memory_history(enabled=None)` to stop. The snapshot holds every
# allocation and free with its stack. To see autocast's copies in it, `copy_recorder` labels each allocation with
# the part of the model running and marks the FP16 copies of weights: on a GPU it writes these labels into the
# allocator's own history (`torch.cuda.memory._set_memory_metadata`); on a CPU it is the course's tensor accounting,
# which keeps the same history in the same format. The quick start runs again under the same budget, recorded:

# %%
from xcomp_lab.lessons.oom import CPU_HISTORY, CUDA_HISTORY, copy_recorder, copy_trace

MAX_ENTRIES = 200_000  # allocations and frees kept; a history that reaches it has lost its start, and is refused
results_dir = params.results_path.parent
recorder = copy_recorder(model, params.device)
if params.device == "cuda":
    start_bytes = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")  # 1. start recording
with recorder:
    traced, _ = run_step(step, model, tokenizer, images, params, budget)                # 2. the failing call
if params.device == "cuda":
    snapshot = torch.cuda.memory._snapshot()                                             # 3. the history
    torch.cuda.memory._dump_snapshot(str(results_dir / "01-oom-snapshot.pickle"))        #    for pytorch.org/memory_viz
    torch.cuda.memory._record_memory_history(enabled=None)                               #    stop recording
    trace = copy_trace(snapshot, start_bytes, max_entries=MAX_ENTRIES, source=CUDA_HISTORY)
else:
    snapshot = recorder.snapshot(traced.memory.error)  # the CPU accounting's history, in the snapshot's format
    trace = copy_trace(snapshot, recorder.start_bytes, source=CPU_HISTORY)
print(f"recorded from {trace.source}: {len(snapshot['device_traces'][0]):,} events, {trace.allocations[-1]:,} "
      f"allocations; the recorded call {'ran out of memory' if not traced.ok else 'fitted'}\n")
print(trace.table())

# %% [markdown]
# Each row is one part of the model, in the order the call ran them; "copies held" is what autocast's cache held
# when that part made its last allocation. The chart draws the same history allocation by allocation: above,
# everything in use with the copies' share shaded on top; below, the copies alone, with a line where each decoder
# layer begins.

# %%
from xcomp_lab.lessons.oom import copy_trace_chart

copy_trace_chart(trace, budget_bytes=budget.limit_bytes,
                 title=f"The failing quick start ({params.scale}, {params.device}), from {trace.source}")

# %% [markdown]
# PyTorch's own viewer reads the same history: `torch.cuda._memory_viz.trace_plot` writes it into one HTML page,
# its *Active Memory Timeline*. `with_categories` gives each allocation a category the viewer colours by: autocast's
# weight copies, other tensors, and "unknown" for what was allocated before recording began (the weights). The page
# loads the viewer's script from the web when opened; on a GPU the cell above also saved the history as a pickle,
# which pytorch.org/memory_viz opens.

# %%
from torch.cuda._memory_viz import trace_plot

from xcomp_lab.lessons.oom import with_categories

html_path = results_dir / "01-oom-trace.html"
html_path.write_text(trace_plot(with_categories(snapshot)))
print(f"saved {html_path}: open it in a browser")

# %% [markdown]
# What filled the budget when the request failed, computed from the trace:

# %%
if trace.oom_event is None:
    print(f"the recorded call did not fail: the copies ({fmt_bytes(copies)} when every layer has run) fitted "
          f"beside everything else in {fmt_bytes(budget.limit_bytes)}")
else:
    without = trace.in_use_at_oom - trace.copies_at_oom + trace.requested_bytes
    print(f"at the failure ({trace.oom_label}): {fmt_bytes(trace.in_use_at_oom)} in use, of which autocast's weight "
          f"copies {fmt_bytes(trace.copies_at_oom)} ({trace.copies_at_oom / trace.in_use_at_oom:.0%}), made by "
          f"{sum(1 for row in trace.part_rows if row[1])} parts of the model one after the other")
    print(f"the failing request: {fmt_bytes(trace.requested_bytes)} = "
          f"x{trace.requested_bytes / trace.copies_at_oom:.2f} the copies held")
    print(f"without the copies the same request needs {fmt_bytes(without)}: "
          f"{'within' if without <= budget.limit_bytes else 'still over'} the budget of {fmt_bytes(budget.limit_bytes)}")

# %% [markdown]
# ## Step 7: two fixes that keep FP32
#
# Either drop autocast (the weights are FP32 anyway), or run inside `torch.inference_mode()`, where autocast
# does not cache. Both under the same budget:

# %%
no_autocast, no_autocast_record = run_step(STEPS["fp32-no-autocast"], model, tokenizer, images, params, budget)
record(params, no_autocast_record)
inference = STEPS["fp32-inference-mode"]
print(inference.describe())
inference_run, inference_record = run_step(inference, model, tokenizer, images, params, budget)
record(params, inference_record)
print((f"caption: {inference_run.captions[0]!r}" + ("  (random weights: noise)" if params.random_weights else ""))
      if inference_run.ok else "caption: none (out of memory)")

# %% [markdown]
# ## Step 8: the kernel is still alive
#
# `run_step` caught the `torch.OutOfMemoryError`, dropped the failed call's frames and measured memory again. On a
# GPU, the first matrix multiply of a process makes cuBLAS allocate a workspace through PyTorch's allocator and keep
# it: the plain `model.chat` of Step 3 was that first multiply here. The cell checks both failed calls, and on a GPU
# frees cuBLAS's workspaces (`torch._C._cuda_clearCublasWorkspaces()`) to see whether they explain what is left.

# %%
left = quickstart.after_release_bytes - quickstart.memory.start_bytes
print(f"run_step: before the {'failed ' if not quickstart.ok else ''}call {fmt_bytes(quickstart.memory.start_bytes)} | after release "
      f"{fmt_bytes(quickstart.after_release_bytes)} | left over {fmt_bytes(left)}")
cleared, above = 0, left
if params.device == "cuda":
    print(f"model.chat of Step 3: left over {fmt_bytes(after_chat - before_chat)}")
    in_use = torch.cuda.memory_allocated()
    torch._C._cuda_clearCublasWorkspaces()
    cleared = in_use - torch.cuda.memory_allocated()
    above = torch.cuda.memory_allocated() - before_chat
    print(f"cuBLAS workspaces freed now: {fmt_bytes(cleared)}; memory {fmt_bytes(torch.cuda.memory_allocated())}, "
          f"{fmt_bytes(above)} above its value before Step 3's model.chat")

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart([quickstart_record, no_autocast_record, inference_record], budget_bytes=budget.limit_bytes,
            title=f"FP32 under a {params.budget_gb:g} GB budget ({params.scale}, {params.device})")

# %% [markdown]
# ## What we learned

# %%
print(f"- FP32 weights use {fmt_bytes(fp32_weights)}, {fp32_weights / budget.limit_bytes:.0%} of the budget: "
      f"params x bytes says they {'fit' if fp32_weights < budget.limit_bytes else 'do not fit'}.")
if quickstart.ok:
    print("- The quick start fitted this budget.")
else:
    over = oom.over_by_bytes
    print(f"- The quick start ran out of memory asking for {fmt_bytes(oom.requested_bytes)} "
          f"({oom.requested_bytes / budget.limit_bytes:.1%} of the budget) with {fmt_bytes(oom.allocated_bytes)} "
          f"allocated: " + (f"the message's fields add up to {fmt_bytes(over)} over the limit." if over and over > 0
                            else "the message's fields reach the limit within their rounding."))
if trace.oom_event is not None:
    print(f"- The recorded call failed in {trace.oom_label} with autocast's weight copies holding "
          f"{fmt_bytes(trace.copies_at_oom)}; without them the request needed {fmt_bytes(without)}, "
          f"{'within' if without <= budget.limit_bytes else 'still over'} the budget.")
print(f"- Without a budget autocast's cache added {fmt_bytes(extra)} ({extra / fp32_weights:.0%} of the weights, "
      f"x{extra / copies:.2f} the FP16 copies of every matmul weight).")
print(f"- Without autocast the peak is {no_autocast.memory.peak_bytes / budget.limit_bytes:.0%} of the budget; "
      f"under inference_mode {inference_run.memory.peak_bytes / budget.limit_bytes:.0%}.")
print(f"- After the {'OOM' if not quickstart.ok else 'quick start'} run_step's memory came back to {fmt_bytes(left)} above its value before the call"
      + (f"; with cuBLAS's workspaces freed ({fmt_bytes(cleared)}), memory is {fmt_bytes(above)} above its value "
         f"before Step 3's model.chat" if params.device == "cuda" else "")
      + (": the kernel needs no restart." if above <= 0 else "."))

# %% [markdown]
# **Questions.** (1) Why does autocast keep the copies under `no_grad` but not under `inference_mode`?
# (2) On which card of notebook 00's table would the quick start have fitted, and with how much to spare?
# (3) Would `.half()` alone have avoided the OOM, and what would it cost? (Notebook 02 measures it.) (4) Which field
# of the CUDA message would tell you that fragmentation, not live tensors, filled the card?
