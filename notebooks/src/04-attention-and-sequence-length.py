# %% [markdown]
# # 04 · Beyond the weights, the peak grows with the prompt: eager attention's T x T scores, batch, KV cache and logits
#
# Where the memory of a caption comes from once the weights are loaded, and how it grows with the image's
# tokens, the batch and the kind of attention: each part measured, then checked against its formula.

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
# ## Step 1: caption in FP16 with the original's eager attention
#
# Notebook 02 halved the weights. What remains on top of them is made while the caption runs. The prompt is
# one sequence of T tokens: the system prompt, the image's tokens and the query. Eager attention, the
# original's, computes in every layer the scores Q·Kᵀ of every token against every token: a tensor of
# **batch x heads x T x T**, then adds the causal mask and takes the softmax in FP32, a second tensor of the
# same shape. It is freed after the layer, but it sets the height of the peak. Generation keeps the keys and
# values of every token (the KV cache), and the prefill ends with logits for every position.

# %%
import dataclasses
import gc

import torch
from xcomp_lab.lessons.sequence import eager_scores_bytes, image_tokens
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.core.units import fmt_bytes


step = STEPS["fp16"]
print(step.describe())
model, tokenizer = load_for_step(step, params)
cfg = model.config
first_kind = cfg._attn_implementation
budget = course_budget(params, model.config)
images = batch_of_images(params)
first_run, first_record = run_step(step, model, tokenizer, images, params, budget)
record(params, first_record)
n_image = image_tokens(cfg, params.image_size)
print(f"{first_kind} attention | prompt {first_run.prompt_tokens} tokens = {n_image} image tokens + "
      f"{first_run.prompt_tokens - n_image} text tokens | one layer's scores {fmt_bytes(eager_scores_bytes(cfg, params.batch_size, first_run.prompt_tokens))} in FP16")

# %% [markdown]
# The weights are most of the peak at this prompt length; the rest splits into the KV cache and the
# activations, the memory that lives only while the call runs.
#
# ## Step 2: the batch
#
# The usual advice for an OOM is "use a smaller batch". Batching multiplies every activation and the KV cache
# by the batch, and leaves the weights alone. The peak of a caption is reached at the prefill (the first
# forward pass over the whole prompt); the decode steps that follow add one token each. So the runs below
# generate a single token (prefill only), measured without a budget to see each peak in full. First the check
# that prefill alone reaches the peak of the whole caption:

# %%
def sweep(model, step, kind, size, batch):
    """Prefill-only caption at `size` px for `batch` images, recorded as 04-<kind>-<size>px-b<batch>."""
    p = dataclasses.replace(params, image_size=size, batch_size=batch, max_new_tokens=1)
    run, rec = run_step(dataclasses.replace(step, name=f"04-{kind}-{size}px-b{batch}"), model, tokenizer,
                        batch_of_images(p), p, budget=None, extra={"image_size": size, "batch": batch})
    record(p, rec)
    return run


default_size = params.image_size or cfg.image_size
runs = {(first_kind, default_size, 1): sweep(model, step, first_kind, default_size, 1)}
prefill_peak = runs[(first_kind, default_size, 1)].memory.peak_bytes
print(f"whole caption ({first_run.new_tokens} new tokens, batch {params.batch_size}) peak "
      f"{fmt_bytes(first_run.memory.peak_bytes)} | prefill only, batch 1: {fmt_bytes(prefill_peak)} | "
      f"x{first_run.memory.peak_bytes / prefill_peak:.3f}")

# %% [markdown]
# At batch 1 the whole caption peaks where its prefill does (ratio 1.000, or very close), so a prefill-only run
# measures the peak. Now two and four images at once:

# %% [markdown]
# **Exercise 4.1: predict, then measure.** Before running the next cell: the usual advice says four images take
# four times the memory of one. Predict the peak at batch 4 as a multiple of the peak at batch 1 just measured:
# a plain number. Write it into `my_batch4_peak_x`; the cell after the batch runs compares it with this run, and
# `answer_4_1.solution()` shows the worked reasoning.

# %%
my_batch4_peak_x = None  # your prediction: peak at batch 4 / peak at batch 1

# %%
for batch in (2, 4):
    runs[(first_kind, default_size, batch)] = sweep(model, step, first_kind, default_size, batch)
one = runs[(first_kind, default_size, 1)].memory
for batch in (1, 2, 4):
    m = runs[(first_kind, default_size, batch)].memory
    made, made_one = m.activations_bytes + m.kv_cache_bytes, one.activations_bytes + one.kv_cache_bytes
    print(f"batch {batch} | peak {fmt_bytes(m.peak_bytes):>10s} (x{m.peak_bytes / one.peak_bytes:.2f}) | "
          f"activations + KV {fmt_bytes(made):>10s} (x{made / made_one:.2f}) | weights {fmt_bytes(m.weights_bytes)}")

# %%
from xcomp_lab.course.exercises import check

answer_4_1 = check("4.1", my_batch4_peak_x,
                   measured=runs[(first_kind, default_size, 4)].memory.peak_bytes / one.peak_bytes,
                   one=one, four=runs[(first_kind, default_size, 4)].memory)

# %% [markdown]
# What the call makes grows about in proportion to the batch; the peak grows less, because the weights do not
# change. So a smaller batch helps exactly as much as the activations weigh against the weights: little when
# the weights are most of the peak, as here, and nothing at all for an OOM that happens with one image, like
# the one notebook 01 reproduced.
#
# ## Step 3: count the tokens an image brings
#
# The vision tower cuts the image into 14 px patches, one token each: (side / 14)² tokens. It was trained at
# one size; at another, its position embeddings are interpolated to the new grid (`interpolate_pos_encoding`),
# so the same model takes bigger images and gives more tokens. The tiny tower was trained at 112 px; the full
# model runs CLIP at 490 px.

# %%
from xcomp_lab.model.scales import config_for_scale

full_cfg = config_for_scale("full")
sizes = sorted({112, 224, 336, cfg.image_size})
text_tokens = first_run.prompt_tokens - n_image
for size in sizes:
    side = size // cfg.vision_config.patch_size
    print(f"{size:4d} px -> {side}x{side} = {image_tokens(cfg, size):5d} image tokens, prompt {text_tokens + image_tokens(cfg, size):5d} tokens")
print(f"full model at {full_cfg.image_size} px -> {image_tokens(full_cfg):5d} image tokens")

# %% [markdown]
# Tripling the side multiplies the image tokens by nine, and image tokens soon outnumber the text.

# %% [markdown]
# **Exercise 4.2: predict, then measure.** Step 4 captions one image at each size of the table above (prefill
# only). From the smallest size to the largest, the prompt grows by the factor the table shows. Predict how many
# times the activations grow over the same span, with the attention this notebook loaded (eager unless you
# changed `attn_implementation`): a plain number. Write it into `my_activation_growth_x`; the cell after Step 4
# compares it with this run, and `answer_4_2.solution()` shows the worked reasoning.

# %%
my_activation_growth_x = None  # your prediction: activations at the largest size / at the smallest

# %% [markdown]
# ## Step 4: grow the prompt and watch the peak
#
# One prefill-only run per image size, still with eager attention:

# %%
for size in sizes:
    if (first_kind, size, 1) not in runs:
        runs[(first_kind, size, 1)] = sweep(model, step, first_kind, size, 1)
rotary_positions = model.model.layers[0].attention.rotary_emb.max_seq_len_cached
for size in sizes:
    run = runs[(first_kind, size, 1)]
    m = run.memory
    print(f"{size:4d} px | {run.prompt_tokens:5d} tokens | peak {fmt_bytes(m.peak_bytes):>10s} | activations "
          f"{fmt_bytes(m.activations_bytes):>10s} | one layer's scores {fmt_bytes(eager_scores_bytes(cfg, 1, run.prompt_tokens)):>10s}"
          f" | {'within' if m.peak_bytes <= budget.limit_bytes else 'OVER'} the budget")
longest = runs[(first_kind, sizes[-1], 1)].prompt_tokens
if rotary_positions > cfg.max_position_embeddings:
    print(f"the {longest}-token prompt passed the {cfg.max_position_embeddings} positions of the rotary tables: "
          f"every layer rebuilt them for {rotary_positions} positions (dynamic NTK), as the original does")
else:
    print(f"the rotary tables cover all {longest} positions: nothing was rebuilt")
weights_fp16 = first_run.memory.weights_bytes
full_prompt = text_tokens + image_tokens(full_cfg)
print(f"one layer's FP16 scores at {first_run.prompt_tokens} tokens: {eager_scores_bytes(cfg, 1, first_run.prompt_tokens) / weights_fp16:.1%} "
      f"of this model's weights | full model at {full_prompt} tokens: "
      f"{eager_scores_bytes(full_cfg, 1, full_prompt) / (8_666_840_064 * 2):.1%} of its FP16 parameters (formula)")

# %%
answer_4_2 = check("4.2", my_activation_growth_x,
                   measured=runs[(first_kind, sizes[-1], 1)].memory.activations_bytes
                   / runs[(first_kind, sizes[0], 1)].memory.activations_bytes,
                   short_tokens=runs[(first_kind, sizes[0], 1)].prompt_tokens,
                   long_tokens=runs[(first_kind, sizes[-1], 1)].prompt_tokens)

# %% [markdown]
# Activations grow much faster than the prompt: the scores grow with T², the rest with T. The last line says
# how much harder this bites at tiny scale: a small model's weights shrink faster than its attention scores,
# so at full scale the same prompts cost a far smaller share of the card. At tiny scale the 336 px prompt also
# passes the rotary tables' 512 positions (the full model has 32,768); the original then rebuilds its tables
# in every layer at a stretched base, which costs memory and changes the positions it encodes.
#
# ## Step 5: switch to sdpa
#
# `torch.nn.functional.scaled_dot_product_attention` computes the same attention in one fused kernel: it
# walks the keys block by block with a running softmax and never stores the T x T scores. One changed argument
# at load:
#
# ```python
# model = AutoModel.from_pretrained(path, dtype=torch.float16, trust_remote_code=True,
#                                   attn_implementation="sdpa")  # changed line
# ```
#
# Which kernels really run depends on the machine, so look: one prefill pass under each attention, with the
# ATen kernels it called.

# %%
from xcomp_lab.run.captioning import prompt_batch
from xcomp_lab.lessons.sequence import leaf_ops

ATTENTION_OPS = ("attention", "softmax", "bmm")


def attention_kernels(model):
    with torch.inference_mode():
        embeds, im_mask = prompt_batch(model, tokenizer, images[:1])
        return leaf_ops(lambda: model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False), contains=ATTENTION_OPS)


kernels = {first_kind: attention_kernels(model)}
del model  # before loading the next: at full scale two models may not fit together
gc.collect()
if params.device == "cuda":
    torch.cuda.empty_cache()

sdpa_step = STEPS["fp16-sdpa"]
print(sdpa_step.describe())
model, tokenizer = load_for_step(sdpa_step, params)
second_kind = model.config._attn_implementation
kernels[second_kind] = attention_kernels(model)
for kind, ops in kernels.items():
    print(f"{kind:6s} ran: {', '.join(f'{name} x{n}' for name, n in ops.items())}")

# %% [markdown]
# Eager attention runs two batched matmuls and a softmax per layer: the scores exist as a tensor. The sdpa
# path runs one fused kernel per layer instead; its name says which (on a CPU, PyTorch's flash-attention kernel
# for CPU rather than the unfused math fallback). Now the same caption and the same prompts:

# %%
second_run, second_record = run_step(sdpa_step, model, tokenizer, images, params, budget)
record(params, second_record)
for size in sizes:
    runs[(second_kind, size, 1)] = sweep(model, sdpa_step, second_kind, size, 1)

# %%
from xcomp_lab.lessons.sequence import peak_vs_tokens_chart

series = {kind: [(runs[(kind, s, 1)].prompt_tokens, runs[(kind, s, 1)].memory.peak_bytes) for s in sizes]
          for kind in (first_kind, second_kind)}
peak_vs_tokens_chart(series, budget_bytes=budget.limit_bytes, weights_bytes=first_run.memory.weights_bytes,
                     title=f"FP16 prefill, {params.scale} replica on {params.device}: eager vs sdpa")

# %% [markdown]
# Both lines start from the same weights; the eager line bends upward with the square of the prompt, the sdpa
# line rises far less. The gap between them, against one layer's scores tensor:

# %%
for size in sizes:
    eager_m, sdpa_m = runs[(first_kind, size, 1)].memory, runs[(second_kind, size, 1)].memory
    tokens = runs[(first_kind, size, 1)].prompt_tokens
    gap = eager_m.peak_bytes - sdpa_m.peak_bytes
    scores = eager_scores_bytes(cfg, 1, tokens)
    print(f"{tokens:5d} tokens | {first_kind} - {second_kind} peak {fmt_bytes(gap):>10s} | scores B x H x T x T in FP16 "
          f"{fmt_bytes(scores):>10s} | x{gap / scores:.2f}")

# %% [markdown]
# The gap grows faster than the scores tensor itself. At its softmax, eager attention holds at once the masked
# scores (FP16), their softmax in FP32 (two FP16-sized copies) and its cast back to FP16, beside the additive
# mask: four to five times one layer's scores, of which sdpa holds none. Where the ratio is lower, the peak is
# set somewhere else (the logits, the MLP) and the scores stay below it.
#
# ## Step 6: the KV cache, predicted and measured
#
# Every layer keeps the keys and values of every token seen, for all KV heads (8 at full scale, fewer than the
# 32 query heads: grouped-query attention):
#
# **KV bytes = 2 x layers x KV heads x head dim x batch x tokens x bytes per element.**
#
# The cache holds the prompt plus every generated token except the last one, which is never fed back.

# %%
from xcomp_lab.lessons.sequence import kv_cache_formula

# (name, run, batch, generated steps): prefill-only runs made one step; a caption as many as its longest row.
steps_of = lambda run: -(-run.new_tokens // params.batch_size)
kv_rows = [(f"{first_kind} caption", first_run, params.batch_size, steps_of(first_run)),
           (f"{second_kind} caption", second_run, params.batch_size, steps_of(second_run))]
kv_rows += [(f"{kind} {size} px batch {batch}", run, batch, 1) for (kind, size, batch), run in runs.items()]
for name, run, batch, steps in kv_rows:
    tokens = run.prompt_tokens + steps - 1
    predicted = kv_cache_formula(cfg, batch, tokens, model.dtype)
    print(f"{name:24s} | {batch} x {tokens:4d} tokens | predicted {fmt_bytes(predicted):>10s} | measured "
          f"{fmt_bytes(run.memory.kv_cache_bytes):>10s} | x{run.memory.kv_cache_bytes / predicted:.2f}")
kv_full = kv_cache_formula(full_cfg, 1, text_tokens + image_tokens(full_cfg) + params.max_new_tokens - 1, "float16")
print(f"full model, one 490 px caption in FP16: {fmt_bytes(kv_full)} by the formula")

# %% [markdown]
# The formula predicts the cache exactly (ratio 1.00). It grows in a straight line with tokens and batch, never
# with T², and it lives for the whole caption, while each layer's scores are freed as soon as the layer ends.
#
# ## Step 7: the logits of the whole prompt, in FP32
#
# The original's forward computes the output head for every prompt position and upcasts the result to FP32
# (`logits.float()`), although generation needs only the last position: batch x T x vocab x 4 bytes, at once.

# %%
from xcomp_lab.lessons.sequence import prefill_logits_bytes

for name, run in ((first_kind, first_run), (second_kind, second_run)):
    logits = prefill_logits_bytes(cfg, params.batch_size, run.prompt_tokens)
    print(f"{name:6s} | FP32 logits {params.batch_size} x {run.prompt_tokens} x {cfg.vocab_size} x 4 B = {fmt_bytes(logits)} | "
          f"{logits / run.memory.activations_bytes:.0%} of the activations ({fmt_bytes(run.memory.activations_bytes)})")
print(f"full model: {full_prompt} x {full_cfg.vocab_size} x 4 B = {fmt_bytes(prefill_logits_bytes(full_cfg, 1, full_prompt))} by the formula")

# %% [markdown]
# The logits are a large share of what the prefill makes, and a share that grows with the vocabulary, not with
# the model's width: keeping only the last position's logits would save almost all of it.

# %% [markdown]
# ## What we learned

# %%
fk, sk = first_kind, second_kind
lo, hi = sizes[0], sizes[-1]
t_lo, t_hi = runs[(fk, lo, 1)].prompt_tokens, runs[(fk, hi, 1)].prompt_tokens
eager_growth = runs[(fk, hi, 1)].memory.activations_bytes / runs[(fk, lo, 1)].memory.activations_bytes
sdpa_growth = runs[(sk, hi, 1)].memory.activations_bytes / runs[(sk, lo, 1)].memory.activations_bytes
b4 = runs[(fk, default_size, 4)].memory
kv_ratios = [run.memory.kv_cache_bytes / kv_cache_formula(cfg, b, run.prompt_tokens + n - 1, model.dtype)
             for _, run, b, n in kv_rows]
logits_share = prefill_logits_bytes(cfg, params.batch_size, first_run.prompt_tokens) / first_run.memory.activations_bytes
print(f"- From {lo} to {hi} px the prompt grows from {t_lo} to {t_hi} tokens (x{t_hi / t_lo:.1f}); activations grow "
      f"x{eager_growth:.1f} with {fk} attention and x{sdpa_growth:.1f} with {sk}.")
print(f"- At {t_hi} tokens {sk} saves {fmt_bytes(runs[(fk, hi, 1)].memory.peak_bytes - runs[(sk, hi, 1)].memory.peak_bytes)} "
      f"of peak; the {fk} peak {'exceeds' if runs[(fk, hi, 1)].memory.peak_bytes > budget.limit_bytes else 'stays within'} "
      f"the budget, the {sk} peak {'exceeds' if runs[(sk, hi, 1)].memory.peak_bytes > budget.limit_bytes else 'stays within'} it.")
print(f"- Batch 4 multiplies the peak by {b4.peak_bytes / one.peak_bytes:.2f} and what the call makes by "
      f"{(b4.activations_bytes + b4.kv_cache_bytes) / (one.activations_bytes + one.kv_cache_bytes):.2f}: "
      f"a smaller batch saves activations, never weights.")
print(f"- The KV cache formula matches every measurement (ratios {min(kv_ratios):.2f} to {max(kv_ratios):.2f}); "
      f"a 490 px caption of the full model needs {fmt_bytes(kv_full)} of it in FP16.")
print(f"- The prefill's FP32 logits are {logits_share:.0%} of the {fk} caption's activations here.")

# %% [markdown]
# **Questions.** (1) At what prompt length would one layer's FP32 softmax of the full model (32 heads) reach
# 1 GiB, and which image size gives that many tokens? (2) Why does grouped-query attention shrink the KV cache
# but not the eager scores? (3) Which would you change first for a 2-image prompt on a tight card: attention
# kind, batch or image size, and by how much would each lower the peak?
