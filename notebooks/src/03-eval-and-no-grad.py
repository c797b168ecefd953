# %% [markdown]
# # 03 · `.eval()` fixes the answers, not the memory; `no_grad` fixes the memory, and `generate()` brings its own
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
# nothing else, in FP32 as in notebook 01, to see the mode it comes in.

# %%
import torch
from transformers import AutoModel, AutoTokenizer
from xcomp_lab.model.loading import resolve_checkpoint
from xcomp_lab.course.steps import course_budget

path = resolve_checkpoint(params.model_name_or_path, params.scale)
model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, device_map={"": params.device},
                                  attn_implementation=params.attn_implementation)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
training_at_load = model.training
modules_training = sum(m.training for m in model.modules())
print(f"model.training after from_pretrained: {training_at_load} | modules in training mode: "
      f"{modules_training} of {sum(1 for _ in model.modules())}")
budget = course_budget(params, model.config)
print(budget.describe())

# %% [markdown]
# `from_pretrained` already calls `.eval()` before it returns: the quick start's `.eval()` is harmless and
# changes nothing.
#
# ## Step 2: what `.eval()` switches off
#
# `.eval()` sets `training = False` on every module. Only modules that read that flag behave differently; in
# this model that leaves the dropout layers of PLoRA (p = 0.05 in the released config), since the vision tower's
# attention dropout is 0. In training mode each forward pass drops a different random 5% of the PLoRA inputs,
# so the same prompt scores differently twice. `reference_logits` runs under `torch.inference_mode()`: the
# gradient switch does not touch dropout.

# %%
from xcomp_lab.run.captioning import caption_images, reference_logits
from xcomp_lab.lessons.grad_modes import dropout_modules

print(f"dropout layers by probability p: {dropout_modules(model)} | vision tower attention dropout p = "
      f"{model.config.vision_config.attention_dropout}")
images = batch_of_images(params)
model.train()
train_a, train_b = (reference_logits(model, tokenizer, images, image_size=params.image_size) for _ in range(2))
model.eval()  # the quick start's .eval()
eval_a, eval_b = (reference_logits(model, tokenizer, images, image_size=params.image_size) for _ in range(2))
train_diff = (train_a - train_b).abs().max().item()
eval_diff = (eval_a - eval_b).abs().max().item()
print(f"same prompt twice, train mode: max |logit diff| {train_diff:.3g}, top-1 token agreement "
      f"{(train_a.argmax(-1) == train_b.argmax(-1)).float().mean().item():.1%}")
print(f"same prompt twice, eval mode:  max |logit diff| {eval_diff:.3g}, identical: {torch.equal(eval_a, eval_b)}")

# %% [markdown]
# In training mode two passes over the same prompt disagree; in eval mode they are bit-identical. Do the
# captions change too? Eight held-out scenes, greedy, once in each mode:

# %%
from xcomp_lab.data import scenes

scene_size = params.image_size or model.config.image_size
scene_images = [image for image, _ in scenes.held_out_dataset(8, image_size=scene_size)]
model.train()
train_captions = caption_images(model, tokenizer, scene_images, max_new_tokens=params.max_new_tokens,
                                image_size=params.image_size)
model.eval()
eval_captions = caption_images(model, tokenizer, scene_images, max_new_tokens=params.max_new_tokens,
                               image_size=params.image_size)
changed = sum(a != b for a, b in zip(train_captions, eval_captions))
print(f"captions that differ between train and eval mode: {changed} of {len(eval_captions)}")

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
# The weights, the layers' outputs and the logits take the same room in both modes. The only extra in training
# mode is dropout's own output and mask, made and dropped inside each PLoRA layer: the difference printed above,
# a small share of the peak and nothing worth calling a saving.

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
# Gradient mode is what decides the memory. With gradients enabled (the default), every operation on a tensor
# that requires grad (the weights do) saves what its backward pass will need: the activations of every layer,
# kept for as long as the output lives. `torch.no_grad()` records nothing; `torch.inference_mode()` records
# nothing either and also skips autograd's version counters. One forward pass over the caption prompt in each
# mode, under the budget; when gradients enabled run out of memory, once more without a budget to see what they
# would need.

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
# Under `no_grad` and `inference_mode` the output holds only the logits, and the activations of each layer are
# freed as the pass moves on. With gradients enabled the output holds a graph with every saved activation: the
# memory "held by the output" stays allocated for as long as the logits are kept, and the last line shows how much
# of the peak's rise is still held once the pass is over: the peak is the saved activations themselves, not a
# passing temporary. Forgetting the gradient mode in a scoring call (a perplexity, a logit comparison like
# notebook 02's) is a real memory bug.

# %% [markdown]
# **Exercise 3.2: predict, then measure.** Now a whole captioning call (`model.generate`, as the quick start
# makes it) with gradients left enabled. Predict its peak as a multiple of the same call's peak under `no_grad`:
# a plain number, as in Exercise 3.1. Write it into `my_grad_caption_x`; the cell after Step 5's comparison
# checks it against this run, and `answer_3_2.solution()` shows the worked reasoning.

# %%
my_grad_caption_x = None  # your prediction: caption peak with gradients enabled / under no_grad

# %% [markdown]
# ## Step 5: a captioning call without `no_grad`
#
# Captions come from `model.generate()`, and transformers decorates `generate` with `@torch.no_grad()`: inside
# it, gradients are off whatever the caller does. What runs *before* `generate` is the caller's: the vision
# tower, the projector and the splice of image tokens into the prompt (`prompt_batch`). Hooks on each part
# record whether autograd was on when it ran, during a captioning call with gradients enabled (the quick start
# without its `torch.set_grad_enabled(False)`):

# %%
from xcomp_lab.lessons.grad_modes import grad_enabled_by_part
from xcomp_lab.course.steps import STEPS, run_step

with grad_enabled_by_part(model) as grad_on:
    grad_caption, grad_caption_record = run_step(STEPS["fp32-grad-enabled"], model, tokenizer, images, params, budget)
for part, seen in grad_on.items():
    print(f"{part:13s} ran with gradients enabled: {sorted(seen)}")

# %% [markdown]
# The decoder and the output head ran with autograd off, although the caller left it on: only the vision tower,
# the projector and the embedding lookup of the prompt's text recorded a graph. How much memory is that? The same
# call under `no_grad` and under `inference_mode` (both without autocast, so only the gradient mode differs), and
# the prompt-building part alone under each mode:

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
print(f"vision + projector + splice: output held {fmt_bytes(prompt['no_grad'].held_bytes)} under no_grad, "
      f"{fmt_bytes(prompt['enabled'].held_bytes)} with gradients enabled: a graph of {fmt_bytes(graph_bytes)}")

# %%
answer_3_2 = check("3.2", my_grad_caption_x, measured=grad_caption.memory.peak_bytes / no_grad_peak,
                   lower_bound=not grad_caption.ok, graph_bytes=graph_bytes, no_grad_peak_bytes=no_grad_peak)

# %% [markdown]
# The forgotten `no_grad` costs the captioning call about the graph of the prompt-building part, not the
# activations of the decoder: the prompt embeddings carry that graph, and they live until `generate` returns, so
# it sits under the whole generation. The captions should be the same in the three modes: the gradient mode
# changes memory, not the arithmetic (the last line of "What we learned" checks it).

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
grad_extra = grad_caption.memory.peak_bytes - no_grad_peak
same_captions = len({tuple(run.captions or ()) for run, _ in captions.values()}) == 1
print(f"- from_pretrained returned model.training = {training_at_load}: the quick start's .eval() changes nothing.")
print(f"- In training mode dropout (p = 0.05 in {sum(dropout_modules(model).values())} PLoRA layers) moved the logits "
      f"by up to {train_diff:.3g} between two identical calls and changed {changed} of {len(eval_captions)} captions; "
      f"in eval mode the calls were identical ({eval_diff:g}). Peak memory: {fmt_bytes(eval_mode_delta)} more in "
      f"training mode ({eval_mode_delta / no_grad.memory.peak_bytes:.1%}).")
print(f"- A scoring pass with gradients enabled {'fits' if enabled.ok else 'runs out of memory'} under the budget "
      f"and needs {'' if needed.ok else 'more than '}{fmt_bytes(needed.memory.peak_bytes)} against "
      f"{fmt_bytes(no_grad.memory.peak_bytes)} under no_grad (inference_mode "
      f"{fmt_bytes(prefill['inference_mode'].memory.peak_bytes)}).")
outcome = "peaks" if grad_caption.ok else "runs out of memory under the budget, having reached"
print(f"- A captioning call with gradients enabled {outcome} {fmt_bytes(grad_extra)} above no_grad "
      f"({grad_extra / no_grad_peak:.1%}), about the {fmt_bytes(graph_bytes)} graph of the vision tower and "
      f"projector: generate() disables gradients itself. Same captions in every mode: {same_captions}.")

# %% [markdown]
# **Questions.** (1) A model with batch normalization instead of dropout: what would `.eval()` change there?
# (2) Why does the prompt's graph stay alive during the whole of `generate`, and what single line inside the
# captioning code would free it without any gradient mode? (3) Notebook 02 compared logits of several models:
# which gradient mode should such a comparison run in, and what would it cost at full scale without one?
