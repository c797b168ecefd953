# %% [markdown]
# # 01 · The FP32 quick start runs out of memory on a 48 GB card, and attention is not to blame
#
# The user story: captioning one image with InternLM-XComposer2-VL-7B on a 48 GB GPU died with *CUDA out of
# memory* inside attention, 44.16 GB in use. Here we reproduce that failure on the replica, read what was in
# memory when it died, find the real cause, and show that the kernel survives it.

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
# On a GPU the course limits the allocator with `torch.cuda.set_per_process_memory_fraction`, so a bigger card
# behaves like a 48 GB one and raises a real `torch.OutOfMemoryError`. On a CPU every tensor allocation is
# counted, with the budget scaled to this model as 48 GB is to the full FP32 model.

# %%
budget = course_budget(params, model.config)
print(budget.describe())

# %% [markdown]
# ## Step 3: caption as the quick start does
#
# The official example runs `torch.set_grad_enabled(False)`, then `model.chat(...)` inside
# `torch.cuda.amp.autocast()`. Prediction by params x bytes: the weights fit with room to spare.

# %%
images = batch_of_images(params)
quickstart, quickstart_record = run_step(step, model, tokenizer, images, params, budget)
record(params, quickstart_record)
print(quickstart.oom_report)

# %% [markdown]
# It fails inside a decoder layer of the prefill pass, the first forward over the whole prompt. The failing
# allocation itself is small: what matters is what was already in use when it was asked for.

# %% [markdown]
# **Exercise 1.1: predict, then measure.** The quick start runs `model.chat` under autocast inside
# `torch.set_grad_enabled(False)`. Step 4 runs that call without a budget, and the same call inside
# `torch.inference_mode()`. Predict how much higher the quick start's peak is than the inference_mode one, as a
# multiple of the FP32 parameters' bytes printed in Step 1: a plain number, 0 for no difference, 0.5 for half
# the weights again. Write it into `my_autocast_extra_x`; the cell after Step 4 compares it with this run, and
# `answer_1_1.solution()` shows the worked reasoning.

# %%
my_autocast_extra_x = None  # your prediction: extra peak / FP32 parameter bytes

# %% [markdown]
# ## Step 4: why? Measure the same call without a budget
#
# Autocast casts each FP32 weight to FP16 before a matmul and, while the weight requires grad (parameters do,
# even under `no_grad`), keeps the FP16 copy cached until the autocast block ends. Layer by layer those copies
# pile up: half the size of the weights again.

# %%
from xcomp_lab.run.call import autocast_copy_bytes

unbounded, _ = run_step(step, model, tokenizer, images, params, budget=None)
uncached, _ = run_step(STEPS["fp32-inference-mode"], model, tokenizer, images, params, budget=None)
extra = unbounded.memory.peak_bytes - uncached.memory.peak_bytes
copies = autocast_copy_bytes(model)
print(f"autocast under no_grad (quick start), no budget: peak {fmt_bytes(unbounded.memory.peak_bytes)}")
print(f"autocast under inference_mode, no budget:        peak {fmt_bytes(uncached.memory.peak_bytes)}")
print(f"difference {fmt_bytes(extra)} | FP16 copies of every linear/conv weight {fmt_bytes(copies)} | x{extra / copies:.2f}")

# %%
from xcomp_lab.course.exercises import check

answer_1_1 = check("1.1", my_autocast_extra_x, measured=extra / fp32_weights, extra_bytes=extra, copies_bytes=copies,
                   weights_bytes=fp32_weights)

# %% [markdown]
# Same computation, same FP16 activations; the only difference is whether autocast keeps its copies. The extra
# peak is about one FP16 copy of every weight that goes through a matmul: the autocast cache, not attention.
#
# ## Step 5: two fixes that keep FP32
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
print(f"caption: {inference_run.captions[0]!r}")

# %% [markdown]
# ## Step 6: the kernel is still alive
#
# `run_step` caught the `torch.OutOfMemoryError`, dropped the failed call's frames and measured memory again:
# on CPU it is back to the byte. On a GPU it can end a few MiB higher when the failed call was the process's first
# matrix multiply: cuBLAS allocates its workspace then and keeps it (33 MiB on an H100).

# %%
print(f"before the failed call {fmt_bytes(quickstart.memory.start_bytes)} | after release "
      f"{fmt_bytes(quickstart.after_release_bytes)} | back at baseline: "
      f"{quickstart.after_release_bytes == quickstart.memory.start_bytes}")

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart([quickstart_record, no_autocast_record, inference_record], budget_bytes=budget.limit_bytes,
            title=f"FP32 under a {params.budget_gb:g} GB budget ({params.scale}, {params.device})")

# %% [markdown]
# ## What we learned

# %%
print(f"- FP32 weights use {fmt_bytes(fp32_weights)}, {fp32_weights / budget.limit_bytes:.0%} of the budget: "
      "params x bytes says they fit.")
print(f"- The quick start {'ran out of memory' if not quickstart.ok else 'fitted'}; autocast's cache of FP16 weight "
      f"copies added {fmt_bytes(extra)} ({extra / fp32_weights:.0%} of the weights).")
print(f"- Without autocast the peak is {no_autocast.memory.peak_bytes / budget.limit_bytes:.0%} of the budget; "
      f"under inference_mode {inference_run.memory.peak_bytes / budget.limit_bytes:.0%}.")

# %% [markdown]
# **Questions.** (1) Why does autocast keep the copies under `no_grad` but not under `inference_mode`?
# (2) The failing allocation is small; which allocation would fail on a 40 GB card? (3) Would `.half()` alone
# have avoided the OOM, and what would it cost? (Notebook 02 measures it.)
