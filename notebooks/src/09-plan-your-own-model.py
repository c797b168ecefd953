# %% [markdown]
# # 09 · Plan your own model: any transformers LLM or VLM, planned from its config and checked against a GPU
#
# The course planned one model. The question a learner leaves with is "and mine?": will Llama 3 8B, Qwen2-VL or
# the model my team fine-tuned fit the card I have, at the batch and prompt length I need? This notebook answers it
# with `xcomp_lab.plan`: from a model's `config.json` alone, with no weights and no GPU, it predicts one `generate`
# call phase by phase, says whether it fits a card, and answers the inverse questions (the largest batch, prompt
# and generation that fit; the cheapest recipe that fits). Then it sets the planner against calls measured on a
# GPU, next to what the usual tool says for the same calls.

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
# ## Why: what the existing tools answer
#
# Searched on 2026-11-30 (issue 17 of this project lists the threads):
#
# | tool | what it counts | what it leaves out |
# |---|---|---|
# | `accelerate estimate-memory` | the weights, from the config on the meta device; INT8/INT4 as the FP32 size / 4 and / 8 | KV cache, activations, logits, the allocator; its docs say to add up to 20% for inference (accelerate issues #3297, #608) |
# | gpu_poor | a formula over saved configs of popular LLMs ("within 500 MB") | VLMs; batch size does not change its inference figure (its issue #9); activation memory (#12) |
# | hf-mem | weights from the safetensors headers, an experimental KV-cache formula, a formula for a warm-up peak | never checked against a GPU; hybrid attention caches (its issue #60) |
# | vLLM's `profile_run`, llama.cpp's `--fit` | measure or allocate on the real GPU, for their own engines | a plan before you own the card; VLM encoders not profiled (vLLM PRs #11210, #48469), the multimodal projector not counted (llama.cpp PR #21489) |
#
# The planner takes another road: it runs the model's own transformers code and its own `generate` loop on fake
# tensors (shapes and dtypes, no data), with the real inputs its processor would make, counts every allocation,
# and passes them through a simulation of PyTorch's CUDA caching allocator, so that it predicts what
# `torch.cuda.max_memory_allocated()` and `max_memory_reserved()` would report. This notebook's model and card:

# %%
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons.plan_any import model_name
from xcomp_lab.memory.cards import card_of_size

PRESET = "qwen2.5-7b"
card = card_of_size(params.budget_gb)
settings = dict(attn=params.attn_implementation, batch=params.batch_size, prompt_tokens=512, new_tokens=8)
print(card.describe())
print(f"model: {PRESET} (published dimensions) | scale {params.scale}: checked on {model_name(PRESET, params.scale)} "
      f"| call: {settings}")

# %% [markdown]
# `model_name_or_path`, `image_size` and `max_new_tokens` are the replica's parameters and play no part here; the
# batch and the attention come from the parameters cell; the prompt is 512 tokens and 8 new tokens are generated,
# as in the matrix of Step 5 (each new token is a step of the replayed loop, and this CPU replays them all).
#
# ## Step 1: plan a published model by its preset name
#
# `estimate(name, ...)` builds the model's configuration from the published `config.json` dimensions the preset
# holds, replays one greedy `generate` call and returns a `Plan`: the peak of each phase (load; vision for a VLM;
# prefill; decode), allocated and reserved, where it happens, the breakdown, whether it fits the card, and what the
# plan assumes (`Plan.notes`). It runs on this CPU and allocates nothing on a GPU; the full-size model takes seconds.

# %%
from xcomp_lab.plan import estimate

published = estimate(PRESET, **settings, device="cuda", card=card)
print(published.table())
for note in published.notes:
    print(f"assumed: {note}")

# %% tags=["nbval-ignore-output"]
print(f"predicted in {published.seconds:.1f} s on this machine's CPU")

# %% [markdown]
# Reading the table, computed from it:

# %%
spare = card.usable_bytes - published.reserved_peak_bytes
print(f"{PRESET} at full size {'fits' if published.fits else 'does not fit'} the {card.name}: reserved peak "
      f"{fmt_bytes(published.reserved_peak_bytes)} of {fmt_bytes(card.usable_bytes)} usable "
      f"({'spare' if spare >= 0 else 'short'} {fmt_bytes(abs(spare))}); the weights are "
      f"{published.weights_bytes / published.reserved_peak_bytes:.0%} of it, the KV cache "
      f"{published.kv_cache_bytes / published.reserved_peak_bytes:.1%}, activations and logits at the peak "
      f"{published.activations_bytes / published.reserved_peak_bytes:.1%}; the allocator holds "
      f"{fmt_bytes(published.reserved_peak_bytes - published.peak_bytes)} more than the tensors' peak.")

# %% [markdown]
# ## Step 2: plan a model from its config.json folder
#
# Your own model arrives as a folder: `config.json` beside the weights. The planner needs only the config: here a
# folder is made in a temporary directory from the preset's configuration (the tiny variant at tiny scale) and
# planned by its path, next to the same model by its preset name. A folder whose `model_type` the planner's
# presets know takes that preset's processor settings for its inputs.

# %%
import tempfile

from xcomp_lab.lessons.plan_any import config_folder

folder = config_folder(PRESET, tempfile.mkdtemp(prefix="my-model-"), tiny=params.scale == "tiny")
print(sorted(p.name for p in folder.iterdir()))
by_folder = estimate(folder, **settings, device="cuda", card=card)
by_name = published if params.scale == "full" else estimate(model_name(PRESET, params.scale), **settings,
                                                            device="cuda", card=card)
for label, plan in (("folder", by_folder), ("preset", by_name)):
    print(f"{label:7s} allocated {fmt_bytes(plan.peak_bytes):>10} | reserved {fmt_bytes(plan.reserved_peak_bytes):>10}"
          f" | {plan.peak_where}")
same = (by_folder.peak_bytes, by_folder.reserved_peak_bytes) == (by_name.peak_bytes, by_name.reserved_peak_bytes)
print("The folder and the preset give " + ("the same plan, to the byte." if same else "different plans."))

# %% [markdown]
# The folder holds nothing but `config.json`: no weights were read or written. The planner replays the
# architectures it has been checked on; a config of another one is refused with a message that says which it knows
# (here a Falcon config, written the same way):

# %%
from transformers import FalconConfig

other = tempfile.mkdtemp(prefix="other-model-")
FalconConfig().save_pretrained(other)
try:
    estimate(other, **settings, device="cuda", card=card)
except ValueError as error:
    print(f"ValueError: {error}")

# %% [markdown]
# A fine-tuned model of a listed architecture plans from its folder as it is (its `model_type` is in its
# `config.json`); another architecture needs the line and the test the message names.
#
# ## Step 3: check the planner yourself
#
# A prediction is worth what its check is. On a CPU the check is the course's tensor accounting
# (`xcomp_lab.memory.measure("cpu")`, every storage counted as it is allocated and freed): the tiny model is built
# with random weights as `from_pretrained` leaves it, the same seeded prompt is generated, and the measured peak is
# set against the planner's prediction for the CPU (`device="cpu"`). Unquantized, the two should agree to the byte.

# %%
from xcomp_lab.lessons.plan_any import run_on_cpu

cpu_settings = dict(settings, dtype="fp32", prompt_tokens=64)
measured_cpu = run_on_cpu(PRESET, **cpu_settings, seed=params.seed)
predicted_cpu = estimate(model_name(PRESET, "tiny"), **cpu_settings, device="cpu")
print(f"CPU accounting, {PRESET}:tiny FP32: predicted {fmt_bytes(predicted_cpu.peak_bytes)} | measured "
      f"{fmt_bytes(measured_cpu.peak_bytes)} | x{measured_cpu.peak_bytes / predicted_cpu.peak_bytes:.4f} | "
      f"{measured_cpu.peak_bytes - predicted_cpu.peak_bytes:+,d} bytes")

# %% [markdown]
# The last figure is the difference in bytes: zero means the planner counted every tensor the real call made.
#
# On a GPU (`device="cuda"`) the next cell measures one real call in plain PyTorch: the model with random weights
# on the card, the cache emptied and the peaks reset, one `generate`, then `torch.cuda.max_memory_allocated()` and
# `max_memory_reserved()`, set against the planner's CUDA prediction for this machine's card. On a CPU it says so
# and runs nothing.

# %% tags=["nbval-ignore-output"]
import gc

import torch

if params.device == "cuda":
    from xcomp_lab.memory.cards import machine_card
    from xcomp_lab.plan import greedy_generate
    from xcomp_lab.plan.build import build_model, make_inputs

    tiny = params.scale == "tiny"
    gpu_model = build_model(PRESET, dtype="bf16", attn=settings["attn"], tiny=tiny, device="cuda", seed=params.seed)
    inputs = {k: v.to("cuda") for k, v in make_inputs(PRESET, batch_size=settings["batch"],
                                                      prompt_tokens=settings["prompt_tokens"], tiny=tiny).items()}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        greedy_generate(gpu_model, inputs, settings["new_tokens"])
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    on_gpu = estimate(model_name(PRESET, params.scale), **settings, dtype="bf16", device="cuda", card=machine_card())
    print(f"{torch.cuda.get_device_name(0)}: allocated predicted {fmt_bytes(on_gpu.peak_bytes)} | measured "
          f"{fmt_bytes(allocated)} | x{allocated / on_gpu.peak_bytes:.4f}")
    print(f"reserved predicted {fmt_bytes(on_gpu.reserved_peak_bytes)} | measured {fmt_bytes(reserved)} | "
          f"x{reserved / on_gpu.reserved_peak_bytes:.4f}")
    del gpu_model, inputs
    gc.collect()
    torch.cuda.empty_cache()
else:
    print(f"device={params.device}: no GPU here, so no torch.cuda.max_memory_allocated(); the CPU accounting above is "
          f"the check that ran. Step 5 reads the GPU check made on an H200.")

# %% [markdown]
# ## Step 4: the inverse questions
#
# The question is usually the other way round: how large a batch fits? The planner's memory grows with the batch,
# so the largest batch that fits is found by bisection over predictions (double while it fits, then halve the
# interval); a call fits when its reserved peak is within the card's usable memory, since reserved memory is what
# runs out. At tiny scale a tiny model fits any real card many times over, so the question is asked of a card
# shrunk to it: 3 times the reserved peak of Step 2's call (`batch_size` prompts). At full scale it is the real
# card.
#
# **Exercise 9.1: predict, then ask the planner.** If one prompt's call takes a third of the card, is the largest
# batch 3, more, or less? Predict it, a whole number of prompts, from Step 1's breakdown (what is paid once, what
# each prompt adds). Write it into `my_largest_prompt_batch`; the cell after the search compares it with the
# planner's answer, and `answer_9_1.solution()` (in a new cell) shows the worked reasoning.

# %%
my_largest_prompt_batch = None  # your prediction, in prompts

# %%
from xcomp_lab.lessons.plan_any import batch_search, scaled_card, search_chart, search_reading

search_card = scaled_card(card, by_name) if params.scale == "tiny" else card
search = batch_search(model_name(PRESET, params.scale), card=search_card, **{k: v for k, v in settings.items()
                                                                              if k != "batch"})
print(search)
for batch, plan in search.plans.items():
    print(f"batch {batch:>3}: allocated {fmt_bytes(plan.peak_bytes):>10} | reserved "
          f"{fmt_bytes(plan.reserved_peak_bytes):>10} | {'fits' if plan.fits else 'does not fit'}")
print(search_reading(search))

# %%
from xcomp_lab.course.exercises import check

answer_9_1 = check("9.1", my_largest_prompt_batch, measured=search.largest or 0,
                   lower_bound=search.largest == search.limit, source="planner",
                   peaks={batch: plan.reserved_peak_bytes for batch, plan in search.plans.items()},
                   budget_bytes=search.card.usable_bytes, card=search.card.name)

# %% tags=["nbval-ignore-output"]
search_figure = search_chart(search, title=f"{model_name(PRESET, params.scale)}: peak against batch "
                                           f"({settings['prompt_tokens']} prompt tokens)")
search_figure

# %% [markdown]
# Each point is one prediction the search made; the red line is the card. Where reserved climbs in steps while
# allocated climbs smoothly, the caching allocator is taking whole segments; the batch is cut where reserved
# crosses the line, not allocated. The same search answers the prompt length and the new tokens
# (`xcomp_lab.plan.largest(model, "prompt_tokens", card=...)`), and `cheapest_recipe` tries the published dtype,
# then INT8, then NF4, sdpa before eager. At full scale they run here; at tiny scale they are left to the command,
# each needing a dozen predictions:

# %% tags=["nbval-ignore-output"]
from xcomp_lab.plan import cheapest_recipe, largest

if params.scale == "full":
    for knob in ("prompt_tokens", "new_tokens"):
        print(largest(PRESET, knob, card=card, show_progress=False, **settings))
    recipe = cheapest_recipe(PRESET, card=card, show_progress=False, **{k: v for k, v in settings.items()
                                                                        if k != "attn"})
    print("cheapest recipe that fits: " + (f"{recipe.settings['dtype']}, {recipe.settings['quantization']}, "
                                           f"{recipe.settings['attn']}" if recipe else "none"))
else:
    print(f"tiny scale: for the full-size answers run `python -m xcomp_lab.plan --model {PRESET} --card "
          f"\"{card.name}\" --prompt-tokens {settings['prompt_tokens']} --new-tokens {settings['new_tokens']}` "
          f"(each answer is a dozen or so predictions like Step 1's, {published.seconds:.0f} s each here)")

# %% [markdown]
# ## Step 5: the measured validation
#
# A planner is only as good as its record against real GPUs. `python -m xcomp_lab.tools.plan_matrix` measured
# eight architectures that transformers ships (Llama 3 8B, Qwen2.5 7B, Mistral 7B, Gemma 2 9B, Phi-3 mini,
# Qwen2-VL 7B, LLaVA 1.5 7B, Idefics3 8B) at full size with random weights, in their published dtype, INT8 and
# NF4, eager and sdpa, batch 1 and 4, two prompt lengths, on an NVIDIA H200, each build (model x quantization)
# loaded in a fresh process and its eight calls made there one after the other, `torch.cuda.empty_cache()` between
# them (what that does to the reserved peak is read further down); the planner predicted every call on a CPU
# (`plan.validate`), and `--compare` wrote its figures, and accelerate's `estimate-memory` figure for the same
# call, beside the measured ones. The committed files are read back here, per architecture and per quantization:

# %%
from xcomp_lab.core.resources import repository_root
from xcomp_lab.lessons.plan_any import read_matrix
from xcomp_lab.plan.validate import matrix_summary, matrix_table, measured_calls

matrix = repository_root() / "results" / "plan-matrix-h200"
rows, records, env = read_matrix(matrix)
calls = measured_calls(records)
gpu = env["runs"][-1]["gpu"]["gpu"]
versions = env["runs"][-1]["versions"]
print(f"{gpu}: {len(calls)} calls measured, {len({(r['preset'], r['quantization']) for r in calls})} builds, "
      f"torch {versions['torch']}, transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}")
summary = matrix_summary(rows)
print(matrix_table(summary))
by_quantization = matrix_summary(rows, by="quantization")
print(matrix_table(by_quantization, by="quantization"))
most = max(by_quantization, key=lambda s: s["under_1pct"])
print(f"Most under-predictions over 1%: quantization {most['group']}, {most['under_1pct']} of its {most['calls']} "
      f"predicted calls.")

# %% [markdown]
# Errors are predicted / measured - 1: negative is an under-prediction, the dangerous side (the plan says it fits,
# the card says out of memory). "worst" is the largest error in size, its sign kept; `calls` counts the calls with
# a prediction (+ those the planner could not predict); accelerate's figure is set against the allocated peak. An
# INT8 plan counts LLM.int8()'s outlier path with every input column an outlier, an upper bound, since which
# columns hold a value of 6.0 or more depends on the activations (its notes say so): its errors are on the safe
# side by design on the allocated peak. What the tables say, computed:

# %%
from xcomp_lab.lessons.plan_any import matrix_reading

print(matrix_reading(summary, rows))

# %% [markdown]
# The INT8 bound is what a plan without data gives. Where the outlier columns are known, `estimate(...,
# int8_outliers=...)` replays that many instead: a fraction of each input's columns, or the counts
# `plan.outliers.calibrate_int8_outliers(model, inputs)` takes from one generate call of your own INT8 model on
# your own prompts (`--int8-outliers counts.json` on the command line): per input width and per quantized linear.
# The matrix's INT8 calls were measured again with those counts recorded, and `plan.validate --int8-outliers
# largest` predicted each call with its own: first with each linear's own count (`int8-layers/`), then with the
# most columns one input of each width held given to every linear of that width (`int8-outliers/`, a run that
# recorded no per-linear counts). Computed:

# %%
from xcomp_lab.core.jsonl import read_jsonl

for folder, how in (("int8-layers", "each linear's own count"),
                    ("int8-outliers", "the most of each width, given to every linear of that width")):
    conditional = read_jsonl(matrix / folder / "compare-int8-largest.jsonl")
    print(f"INT8 with the measured outlier columns, {how} ({folder}/):")
    print(matrix_table(matrix_summary(conditional)))

# %% [markdown]
# What is left on the reserved peak? The caching allocator reserves segments as the blocks it frees and reuses
# allow, and which of two equal free blocks it picks depends on their addresses, which the driver hands out. A plan
# is one call after a fresh load. In the matrix a call followed its build's earlier calls, whose segments
# `empty_cache()` gave back to the driver, and the driver puts new segments into the address ranges freed ones
# left (the allocator traces show it): where a call's blocks land then depends on the calls before it. So the calls
# the matrix put furthest from the plan were measured again alone, each in a fresh process that loads the model and
# makes that call (`alone/`; LLaVA's two unquantized calls shared one, the shorter prompt first), and one build
# (LLaVA 1.5, unquantized and NF4) twice more as in the matrix (`repeats/`). The INT8 calls are planned with each
# linear's own outlier columns. Computed:

# %%
from xcomp_lab.lessons.plan_any import reserved_alone, reserved_repeats

calibrated = ([r for r in rows if r["quantization"] != "int8"]
              + read_jsonl(matrix / "int8-layers" / "compare-int8-largest.jsonl"))
alone = read_jsonl(matrix / "alone" / "compare.jsonl") + read_jsonl(matrix / "alone" / "compare-int8-largest.jsonl")
print(reserved_alone(calibrated, alone))
print(matrix_table(matrix_summary(alone)))
print(reserved_repeats(matrix, rows))

# %% tags=["nbval-ignore-output"]
from xcomp_lab.lessons.plan_any import matrix_chart

matrix_figure = matrix_chart(rows)
matrix_figure

# %% [markdown]
# On the diagonal the prediction is the measurement. The grey crosses are accelerate's weights-only figure: a cross
# sits below the diagonal by what the call adds to the weights and that figure leaves out (KV cache, activations,
# logits, the allocator's rounding, the cuBLAS workspace, the parts quantization leaves in 16 bits); the reading
# above counts on how many calls and by how much.
#
# ## Step 6: the planner, for your model
#
# Pick a model (a preset at full size or its tiny variant; for your own folder call `estimate("path/to/folder",
# ...)` as in Step 2), a card, dtype, quantization, attention, batch, prompt and new tokens, and press *Predict*.
# It shows Step 1's plan until then; a full-size prediction takes about as long as Step 1's (printed there).

# %% tags=["nbval-ignore-output"]
from xcomp_lab.lessons.plan_any import plan_widget

plan_widget(PRESET, card, initial=published)

# %% [markdown]
# ## What we learned

# %%
print(f"- {PRESET} at full size, {settings['batch']} x {settings['prompt_tokens']} prompt tokens + "
      f"{settings['new_tokens']} new: reserved peak {fmt_bytes(published.reserved_peak_bytes)}, "
      f"{'fits' if published.fits else 'does not fit'} the {card.name} ({fmt_bytes(card.usable_bytes)} usable).")
print(f"- A config.json folder and the preset name gave {'the same plan' if same else 'different plans'}; "
      f"the CPU check was off by {measured_cpu.peak_bytes - predicted_cpu.peak_bytes:+,d} bytes.")
print(f"- {search}.")
reading = matrix_reading(summary, rows).splitlines()
print(f"- On the {gpu} matrix:")
for line in reading[1:3] or reading:
    print(f"  {line}")

# %% [markdown]
# **Questions.** (1) Step 1's table splits the peak into weights, KV cache and activations: which part would you
# shrink first for a longer prompt, and which for a larger batch? (2) Why does the search cut the batch where the
# reserved peak crosses the card's line rather than the allocated one? (3) accelerate's `estimate-memory` counts the
# weights only: on which calls of the matrix is it furthest from the measured peak, and what does the planner count
# that it does not?
