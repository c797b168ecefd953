# %% [markdown]
# # 03 · `.eval()` switches dropout off; the gradient mode decides what autograd keeps, and `generate()` sets its own
#
# The usual advice for inference is "call `.eval()` and wrap it in `torch.no_grad()`, or you will run out of
# memory". These are two different switches: `.eval()` changes what some modules compute (dropout), the
# gradient mode changes what autograd keeps. Here each is measured on its own, on a scoring call and on a
# captioning call.

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
# ## Step 1: load with plain `from_pretrained` and look at the mode
#
# The quick start ends its load with `.eval()`. Here the model is loaded with `AutoModel.from_pretrained` and
# nothing else, in FP32 as in notebook 01, to see the mode it comes in. The replica is loaded with transformers 5's
# `dtype=` and this notebook's attention; the original's own code with transformers 4.33.2's `torch_dtype=` and no
# `attn_implementation`, which its constructor refuses.

# %%
import torch
from transformers import AutoModel, AutoTokenizer
from xcomp_lab.model.loading import resolve_checkpoint
from xcomp_lab.course.steps import course_budget

path = resolve_checkpoint(params.model_name_or_path, params.scale)
fp32 = {"torch_dtype": torch.float32} if params.original_code else {
    "dtype": torch.float32, "attn_implementation": params.attn_implementation}
model = AutoModel.from_pretrained(path, trust_remote_code=True, device_map={"": params.device}, **fp32)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
training_at_load = model.training
modules_training = sum(m.training for m in model.modules())
print(f"model.training after from_pretrained: {training_at_load} | modules in training mode: "
      f"{modules_training} of {sum(1 for _ in model.modules())}")
print("so the quick start's .eval() " + ("changes nothing: the model is in eval mode already" if not modules_training
                                         else f"switches {modules_training} modules to eval mode"))
budget = course_budget(params, model.config)
random_weights = params.random_weights
print(budget.describe())

# %% [markdown]
# ## Step 2: what `.eval()` switches off
#
# `.eval()` sets `training = False` on every module. Only modules that read that flag behave differently: in this
# model's code that is the dropout inside each PLoRA projection (`Plora_B(Plora_A(lora_dropout(x)))`, p = 0.05 in
# the released model), and the vision tower's attention dropout, whose p is printed below. In training mode each
# forward pass drops a different random share p of the PLoRA inputs. `reference_logits` runs under
# `torch.inference_mode()`: the gradient switch does not touch dropout.

# %%
from xcomp_lab.run.captioning import caption_images, reference_logits
from xcomp_lab.lessons.grad_modes import dropout_modules

vision_config = model.vit.vision_tower.config if params.original_code else model.config.vision_config
print(f"dropout layers by probability p: {dropout_modules(model)} | vision tower attention dropout p = "
      f"{vision_config.attention_dropout}")
images = batch_of_images(params)
model.train()
train_a, train_b = (reference_logits(model, tokenizer, images, image_size=params.image_size) for _ in range(2))
model.eval()  # the quick start's .eval()
eval_a, eval_b = (reference_logits(model, tokenizer, images, image_size=params.image_size) for _ in range(2))
train_diff = (train_a - train_b).abs().max().item()
eval_diff = (eval_a - eval_b).abs().max().item()
train_top1 = (train_a.argmax(-1) == train_b.argmax(-1)).float().mean().item()
print(f"same prompt twice, train mode: max |logit diff| {train_diff:.3g}, top-1 token agreement {train_top1:.1%}"
      + (" (random weights: top-1 is noise)" if random_weights else ""))
print(f"same prompt twice, eval mode:  max |logit diff| {eval_diff:.3g}, identical: {torch.equal(eval_a, eval_b)}")

# %% [markdown]
# The two lines compare two passes over the same prompt in each mode: how far apart they land, and whether they
# are bit-identical. Do the captions change too? Eight held-out scenes, greedy, once in each mode:

# %%
from xcomp_lab.data import scenes
from xcomp_lab.course.notebook import image_grid

scene_size, _ = image_grid(model, params)
scene_images = [image for image, _ in scenes.held_out_dataset(8, image_size=scene_size)]
model.train()
train_captions = caption_images(model, tokenizer, scene_images, max_new_tokens=params.max_new_tokens,
                                image_size=params.image_size)
model.eval()
eval_captions = caption_images(model, tokenizer, scene_images, max_new_tokens=params.max_new_tokens,
                               image_size=params.image_size)
changed = sum(a != b for a, b in zip(train_captions, eval_captions))
print(f"captions that differ between train and eval mode: {changed} of {len(eval_captions)}"
      + (" (random weights: captions are noise)" if random_weights else ""))

# %% [markdown]
# Whatever the count, a train-mode caption is a random draw: rerun it and it may change. That is the reason for
# `.eval()` at inference: reproducible answers.
#
# ## Step 3: does `.eval()` save memory?
#
# The same measured forward pass over the caption prompt (the *prefill*, as a scoring call makes it), under
# `no_grad`, once in each mode, under the course budget.

# %%
from xcomp_lab.lessons.grad_modes import run_prefill
from xcomp_lab.course.results import build_record
from xcomp_lab.core.units import fmt_bytes


def prefill_record(name, run):
    return build_record(name, {**params.as_dict(), "grad": run.grad, "training": run.training}, run.memory,
                        extra={"prompt_tokens": run.tokens, "held_bytes": run.held_bytes})


model.train()
train_prefill = run_prefill(model, tokenizer, images, device=params.device, grad="no_grad", budget=budget,
                            image_size=params.image_size, label="03-prefill-train-mode")
model.eval()
eval_prefill = run_prefill(model, tokenizer, images, device=params.device, grad="no_grad", budget=budget,
                           image_size=params.image_size, label="03-prefill-no-grad")
train_record = record(params, prefill_record(train_prefill.memory.label, train_prefill))
eval_mode_delta = train_prefill.memory.peak_bytes - eval_prefill.memory.peak_bytes
print(f"train mode peak {fmt_bytes(train_prefill.memory.peak_bytes)} | eval mode peak "
      f"{fmt_bytes(eval_prefill.memory.peak_bytes)} | difference {fmt_bytes(eval_mode_delta)} "
      f"({eval_mode_delta / eval_prefill.memory.peak_bytes:.1%} of the peak)")

# %% [markdown]
# The weights, the layers' outputs and the logits are the same in both modes; what training mode adds is
# dropout's own output and mask, made and dropped inside each PLoRA layer. The last line gives its size as a share
# of the peak; Step 4 measures the gradient mode on the same pass, for scale.

# %% [markdown]
# **Exercise 3.1: predict, then measure.** Step 4 runs the same forward pass over the caption prompt (a scoring
# call: no generation) with gradients enabled, as a script that forgets `no_grad` does. Predict its peak as a
# multiple of the peak under `no_grad` just measured: a plain number, 1 for no difference, 2 for twice as much.
# Write it into `my_grad_scoring_x`; the cell after Step 4 compares it with this run, and
# `answer_3_1.solution()` shows the worked reasoning.

# %%
my_grad_scoring_x = None  # your prediction: peak with gradients enabled / peak under no_grad

# %% [markdown]
# ## Step 4: a scoring call under each gradient mode
#
# The gradient mode decides what autograd keeps. With gradients enabled (the default), every operation on a tensor
# that requires grad (the weights do) saves what its backward pass will need: the activations of every layer,
# kept for as long as the output lives. `torch.no_grad()` records nothing; `torch.inference_mode()` records
# nothing either and also skips autograd's version counters, and its outputs are *inference tensors*, which
# autograd refuses later (PyTorch's autograd mechanics notes).
#
# First in plain PyTorch, one pass under each context: on a GPU with the allocator's counters
# (`torch.cuda.reset_peak_memory_stats()`, then `max_memory_allocated()` and `memory_allocated()` against the
# memory at the start), on a CPU with the course's tensor accounting (`xcomp_lab.memory.measure`). The third pass
# adds the quick start's autocast with `cache_enabled=False`, which computes in FP16 without keeping autocast's
# FP16 copies of the FP32 weights (Step 5 shows what the cache costs).

# %%
import contextlib

from xcomp_lab.memory.measure import measure
from xcomp_lab.run.captioning import prompt_batch

with torch.no_grad():
    embeds, im_mask = prompt_batch(model, tokenizer, images, image_size=params.image_size)  # (N, T, C), (N, T)


@contextlib.contextmanager
def peak_above_start(name):
    if params.device == "cuda":  # the CUDA allocator's counters
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield
        peak, end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    else:  # the CPU counterpart: the course's tensor accounting
        with measure("cpu") as m:
            yield
        start, peak, end = m.result.start_bytes, m.result.peak_bytes, m.result.end_bytes
    print(f"{name:42s} peak +{fmt_bytes(peak - start):>10s} | held after it +{fmt_bytes(end - start):>10s}",
          end=" | ")


print(f"measured by {'the CUDA allocator' if params.device == 'cuda' else 'the CPU tensor accounting'}")
with peak_above_start("torch.no_grad()"), torch.no_grad():
    logits = model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits  # (N, T, vocab)
print(f"requires_grad {logits.requires_grad}, inference tensor {logits.is_inference()}")
del logits
with peak_above_start("torch.inference_mode()"), torch.inference_mode():
    logits = model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits
print(f"requires_grad {logits.requires_grad}, inference tensor {logits.is_inference()}")
del logits
with peak_above_start("no_grad + autocast(cache_enabled=False)"), torch.no_grad(), \
        torch.autocast(params.device, dtype=torch.float16, cache_enabled=False):
    logits = model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits
print(f"requires_grad {logits.requires_grad}, inference tensor {logits.is_inference()}")
del logits, embeds, im_mask
largest = max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
print(f"autocast casts each FP32 weight to FP16 just before its matrix product: the largest such copy here is "
      f"{fmt_bytes(largest * 2)}, alive while its product runs; its activations are FP16")

# %% [markdown]
# Each line is one pass: how far the memory rose above its start, what the logits still hold after it, and what
# kind of tensor they are. Under autocast the peak trades FP16 activations (half the size) against the transient
# FP16 copy of the weight being multiplied (the last line), so which way it moves against `no_grad` alone
# depends on the model's sizes. `run_prefill()` wraps the same measurement with the course budget and survives an
# out-of-memory error; with it, one pass in each gradient mode, and when gradients enabled run out of memory,
# once more without a budget to see what they would need.

# %%
prefill = {"enabled": run_prefill(model, tokenizer, images, device=params.device, grad="enabled",  # the bug
                                  budget=budget, image_size=params.image_size, label="03-prefill-grad-enabled"),
           "no_grad": eval_prefill,  # measured in Step 3
           "inference_mode": run_prefill(model, tokenizer, images, device=params.device,
                                         grad="inference_mode",  # changed line: the fix
                                         budget=budget, image_size=params.image_size,
                                         label="03-prefill-inference-mode")}
unbudgeted = None
if not prefill["enabled"].ok:
    unbudgeted = run_prefill(model, tokenizer, images, device=params.device, grad="enabled", budget=None,
                             image_size=params.image_size, label="03-prefill-grad-enabled-no-budget")
prefill_records = []
for mode, run in prefill.items():
    r = prefill_record(run.memory.label, run)
    if mode == "enabled" and unbudgeted is not None:
        r["extra"].update(unbudgeted_ok=unbudgeted.ok, unbudgeted_peak_bytes=unbudgeted.memory.peak_bytes,
                          unbudgeted_held_bytes=unbudgeted.held_bytes)
    prefill_records.append(record(params, r))
for mode, run in prefill.items():
    held = f"held by the output {fmt_bytes(run.held_bytes):>10s}" if run.ok else "no output: ran out of memory"
    print(f"{mode:15s} {'fits' if run.ok else 'OOM ':4s} peak {fmt_bytes(run.memory.peak_bytes):>10s} | {held} | "
          f"output requires grad: {run.output_requires_grad}")
if unbudgeted is not None:
    print(f"gradients enabled, no budget: {'fits' if unbudgeted.ok else 'OOM even on the whole card'} | peak "
          f"{fmt_bytes(unbudgeted.memory.peak_bytes)} | held by the output {fmt_bytes(unbudgeted.held_bytes)}")
logits_bytes = params.batch_size * prefill["no_grad"].tokens * model.config.vocab_size * 4  # (N, T, vocab) FP32
print(f"the logits alone: {params.batch_size} x {prefill['no_grad'].tokens} x {model.config.vocab_size:,} x 4 bytes = "
      f"{fmt_bytes(logits_bytes)}; no_grad and inference_mode outputs hold exactly that: "
      f"{prefill['no_grad'].held_bytes == logits_bytes} and {prefill['inference_mode'].held_bytes == logits_bytes}")
needed = prefill["enabled"] if prefill["enabled"].ok else unbudgeted
if needed.ok:
    rise = needed.memory.peak_bytes - needed.memory.start_bytes
    print(f"gradients enabled: the peak rose {fmt_bytes(rise)} above the memory at start; the output still holds "
          f"{fmt_bytes(needed.held_bytes)} of it after the pass ({needed.held_bytes / rise:.1%})")

# %%
from xcomp_lab.course.exercises import check

answer_3_1 = check("3.1", my_grad_scoring_x, measured=needed.memory.peak_bytes / prefill["no_grad"].memory.peak_bytes,
                   lower_bound=not needed.ok, enabled=needed.memory, no_grad=prefill["no_grad"].memory)

# %% [markdown]
# When `no_grad` and `inference_mode` outputs hold exactly the logits (the line above checks), the activations of
# each layer were freed as the pass moved on. With gradients enabled the output holds a graph with every saved
# activation: the memory "held by the output" stays allocated for as long as the logits are kept, and the last line says how much
# of the peak's rise is still held once the pass is over. Forgetting the gradient mode in a scoring call (a
# perplexity, a logit comparison like notebook 02's) costs what those lines measure.
#
# ## Step 5: where `no_grad` and `inference_mode` differ: autocast's weight cache
#
# Without autocast, the lines above set the two modes' peaks side by side. The quick start adds `torch.cuda.amp.autocast()`,
# which casts each FP32 weight to FP16 for its matrix product and, while the autocast block lasts, keeps the copy
# of every weight that requires grad (parameters do, even under `no_grad`). Inside `inference_mode` autocast keeps
# no copies from torch 2.10 on (PyTorch PR #165068); `torch.autocast(..., cache_enabled=False)` keeps none on any
# version. The same scoring pass under autocast, in the three ways, under the budget:

# %%
from xcomp_lab.lessons.grad_modes import copies_kept
from xcomp_lab.run.call import autocast_copy_bytes

copies = autocast_copy_bytes(model)
amp_runs = {name: run_prefill(model, tokenizer, images, device=params.device, grad=grad, use_autocast=True,
                              cache_enabled=cache, budget=budget, image_size=params.image_size, label=label)
            for name, grad, cache, label in (
                ("no_grad + autocast", "no_grad", True, "03-prefill-no-grad-autocast"),
                ("inference_mode + autocast", "inference_mode", True, "03-prefill-inference-mode-autocast"),
                ("no_grad + autocast(cache_enabled=False)", "no_grad", False, "03-prefill-no-grad-autocast-uncached"))}
for run in amp_runs.values():
    record(params, prefill_record(run.memory.label, run))
print(f"torch {torch.__version__} | autocast's FP16 copies of this model's linear weights: {fmt_bytes(copies)} | "
      f"the pass without autocast under no_grad peaked {fmt_bytes(prefill['no_grad'].memory.peak_bytes)}")
for name, run in amp_runs.items():
    rise = run.memory.peak_bytes - prefill["no_grad"].memory.peak_bytes
    print(f"{name:40s} {'fits' if run.ok else 'OOM ':4s} peak {fmt_bytes(run.memory.peak_bytes):>10s} "
          f"({'+' if rise >= 0 else '-'}{fmt_bytes(abs(rise))}) | kept the copies: "
          f"{copies_kept(run, prefill['no_grad'], copies)}")

# %% [markdown]
# "Kept the copies" is read from the peak: out of memory where the pass without autocast fits, or a peak at least
# half the copies higher. Whether `inference_mode` avoids the cache depends on the torch version printed above.

# %% [markdown]
# **Exercise 3.2: predict, then measure.** Now a whole captioning call (`model.generate`, as the quick start
# makes it) with gradients left enabled. Predict its peak as a multiple of the same call's peak under `no_grad`:
# a plain number, as in Exercise 3.1. Write it into `my_grad_caption_x`; the cell after Step 6's comparison
# checks it against this run, and `answer_3_2.solution()` shows the worked reasoning.

# %%
my_grad_caption_x = None  # your prediction: caption peak with gradients enabled / under no_grad

# %% [markdown]
# ## Step 6: a captioning call without `no_grad`
#
# Captions come from `model.generate()`, and transformers decorates `generate` with `@torch.no_grad()`: inside
# it, gradients are off whatever the caller does. What runs *before* `generate` is the caller's: the vision
# tower, the projector and the splice of image tokens into the prompt (`prompt_batch`). The original's own `chat()`
# is itself decorated with `@torch.no_grad()` (its source), so there nothing of the call is the caller's. Hooks on
# each part record whether autograd was on when it ran, during a captioning call with gradients enabled (the quick
# start without its `torch.set_grad_enabled(False)`), for the model loaded here:

# %%
from xcomp_lab.lessons.grad_modes import grad_enabled_by_part
from xcomp_lab.course.steps import STEPS, run_step

with grad_enabled_by_part(model) as grad_on:
    grad_caption, grad_caption_record = run_step(STEPS["fp32-grad-enabled"], model, tokenizer, images, params, budget)
for part, seen in grad_on.items():
    print(f"{part:13s} ran with gradients enabled: {sorted(seen)}")
graph_parts = [part for part, seen in grad_on.items() if True in seen]
print(f"parts that ran with autograd on: {graph_parts}")

# %% [markdown]
# The last line names the parts that ran with autograd on, and so recorded a graph for a backward pass. How much
# memory is that? The same call under `no_grad` and under `inference_mode` (both without autocast, so only the
# gradient mode differs), and the prompt-building part alone under each mode:

# %%
import dataclasses

from xcomp_lab.lessons.grad_modes import run_prompt

caption_steps = [STEPS["fp32-no-autocast"], STEPS["fp32-grad-enabled"],
                 dataclasses.replace(STEPS["fp32-no-autocast"], name="03-fp32-inference-mode-no-autocast",
                                     title="FP32, inference_mode without autocast", grad="inference_mode")]
captions = {STEPS["fp32-grad-enabled"].name: (grad_caption, grad_caption_record)}
for step in caption_steps:
    if step.name not in captions:
        captions[step.name] = run_step(step, model, tokenizer, images, params, budget)
caption_records = [record(params, captions[step.name][1]) for step in caption_steps]
prompt = {mode: run_prompt(model, tokenizer, images, device=params.device, grad=mode, image_size=params.image_size,
                           label=f"03-prompt-{name}")
          for mode, name in (("no_grad", "no-grad"), ("enabled", "grad-enabled"))}
for run in prompt.values():
    record(params, prefill_record(run.memory.label, run))
no_grad_peak = captions["fp32-no-autocast"][0].memory.peak_bytes
for step in caption_steps:
    run = captions[step.name][0]
    print(f"{step.name:36s} peak {fmt_bytes(run.memory.peak_bytes):>10s} | vs no_grad "
          f"{fmt_bytes(run.memory.peak_bytes - no_grad_peak):>9s} | "
          + (f"caption {run.captions[0]!r:.40}" if run.ok else "OOM under the budget"))
graph_bytes = prompt["enabled"].held_bytes - prompt["no_grad"].held_bytes
grad_extra = grad_caption.memory.peak_bytes - no_grad_peak
print(f"vision + projector + splice: output held {fmt_bytes(prompt['no_grad'].held_bytes)} under no_grad, "
      f"{fmt_bytes(prompt['enabled'].held_bytes)} with gradients enabled: a graph of {fmt_bytes(graph_bytes)}")
print(f"the call with gradients enabled peaked {fmt_bytes(grad_extra)} above no_grad: "
      f"x{grad_extra / graph_bytes:.2f} that graph" if graph_bytes > 0 else "no graph was recorded")

# %%
answer_3_2 = check("3.2", my_grad_caption_x, measured=grad_caption.memory.peak_bytes / no_grad_peak,
                   lower_bound=not grad_caption.ok, graph_bytes=graph_bytes, no_grad_peak_bytes=no_grad_peak)

# %% [markdown]
# The last line of the comparison sets the call's extra peak against the graph of the prompt-building part: the
# prompt embeddings carry that graph, and they live until `generate` returns. Whether the captions are the same in
# the three modes is checked in "What we learned".

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart(prefill_records + caption_records, budget_bytes=budget.limit_bytes,
            title=f"Gradient modes: one scoring pass and one caption ({params.scale}, {params.device})")

# %% [markdown]
# The first three bars are the scoring pass, the last three the captioning call; a hatched bar ran out of memory
# under the budget, at the height it had reached.
#
# ## What we learned

# %%
enabled, no_grad = prefill["enabled"], prefill["no_grad"]
same_captions = len({tuple(run.captions or ()) for run, _ in captions.values()}) == 1
print(f"- from_pretrained returned model.training = {training_at_load}: the quick start's .eval() "
      + ("changes nothing." if not modules_training else f"switched {modules_training} modules to eval mode."))
print(f"- In training mode dropout (p = {max(dropout_modules(model))} in {sum(dropout_modules(model).values())} "
      f"PLoRA layers) moved the logits by up to {train_diff:.3g} between two identical calls and changed "
      + (f"{changed} of {len(eval_captions)} captions (random weights: noise)" if random_weights else
         f"{changed} of {len(eval_captions)} captions")
      + f"; in eval mode the calls were {'identical' if torch.equal(eval_a, eval_b) else 'not identical'}. "
      f"Peak memory: {fmt_bytes(eval_mode_delta)} more in training mode "
      f"({eval_mode_delta / no_grad.memory.peak_bytes:.1%}), against "
      f"{'more than ' if not needed.ok else ''}{fmt_bytes(needed.memory.peak_bytes - no_grad.memory.peak_bytes)} "
      f"more with gradients enabled.")
print(f"- A scoring pass with gradients enabled {'fits' if enabled.ok else 'runs out of memory'} under the budget "
      f"and needs {'' if needed.ok else 'more than '}{fmt_bytes(needed.memory.peak_bytes)} against "
      f"{fmt_bytes(no_grad.memory.peak_bytes)} under no_grad (inference_mode "
      f"{fmt_bytes(prefill['inference_mode'].memory.peak_bytes)}).")
kept = {name: copies_kept(run, no_grad, copies) for name, run in amp_runs.items()}
print(f"- Under autocast, the weight copies ({fmt_bytes(copies)}) were kept by: "
      + (", ".join(name for name, k in kept.items() if k) or "none of the three")
      + f" (torch {torch.__version__}).")
outcome = "peaks" if grad_caption.ok else "runs out of memory under the budget, having reached"
near_graph = graph_bytes > 0 and 0.9 <= grad_extra / graph_bytes <= 1.1
if graph_parts:
    against = (f"about the {fmt_bytes(graph_bytes)} graph of {', '.join(graph_parts)}" if near_graph else
               f"against a {fmt_bytes(graph_bytes)} graph of {', '.join(graph_parts)}")
    against += (": generate() ran the decoder and head without gradients"
                if grad_on["decoder"] and True not in grad_on["decoder"] | grad_on["output head"] else "")
else:
    against = (f"and no part of it ran with gradients enabled (the prompt, built outside it with gradients, "
               f"would hold a {fmt_bytes(graph_bytes)} graph)")
print(f"- A captioning call with gradients enabled {outcome} {fmt_bytes(grad_extra)} above no_grad "
      f"({grad_extra / no_grad_peak:.1%}), " + against
      + f". Same captions in every mode: {same_captions}" + (" (random weights: noise)." if random_weights else "."))

# %% [markdown]
# **Questions.** (1) A model with batch normalization instead of dropout: what would `.eval()` change there?
# (2) If the prompt's graph stays alive during the whole of `generate`, why, and what single line inside the
# captioning code would free it without any gradient mode? (3) Notebook 02 compared logits of several models:
# which gradient mode should such a comparison run in, and what would it cost at full scale without one?
