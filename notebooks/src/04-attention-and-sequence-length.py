# %% [markdown]
# # 04 · Beyond the weights, the peak grows with the prompt; eager attention's T x T scores set it only where they outweigh the logits of every position
#
# Where the memory of a caption comes from once the weights are loaded, and how it grows with the image's
# tokens, the batch and the kind of attention: each part measured and checked against its formula, then the
# part that sets the peak found at this scale, and why the small and the full model differ there.
#
# With a checkpoint of the original model's own code (`model_name_or_path`, run with transformers 4.33.2) every
# step runs through that code: its `model.chat`, and its `generate` for several prompts at once. Where a step
# does not apply to it (another image size, sdpa), the notebook says why, read from its code and config.

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
# **batch x heads x T x T**, then adds the causal mask and takes the softmax in FP32, a tensor of the same
# shape at twice the bytes. Both are freed when the layer ends. Generation keeps the keys and values of every
# token (the KV cache), and the prefill ends with the logits of every position over the whole vocabulary.
# Which of these sets the peak is a question of their sizes, which this notebook measures.

# %%
import dataclasses
import gc

import torch
from xcomp_lab.lessons.sequence import attention_kind, eager_scores_bytes, image_tokens, logits_peak_bytes, model_shape
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.core.units import fmt_bytes


step = STEPS["fp16"]
print(step.describe())
model, tokenizer = load_for_step(step, params)
cfg = model_shape(model)  # the sizes the formulas read: vocabulary, heads, head size, image side and patch
first_kind = attention_kind(model)
budget = course_budget(params, model.config)
images = batch_of_images(params)
first_run, first_record = run_step(step, model, tokenizer, images, params, budget)
record(params, first_record)
n_image = image_tokens(cfg, params.image_size)
m = first_run.memory
print(f"{first_kind} attention | prompt {first_run.prompt_tokens} tokens = {n_image} image tokens + "
      f"{first_run.prompt_tokens - n_image} text tokens | one layer's scores {fmt_bytes(eager_scores_bytes(cfg, params.batch_size, first_run.prompt_tokens))} in FP16")
print(f"of the peak: weights {m.weights_bytes / m.peak_bytes:.0%}, KV cache {m.kv_cache_bytes / m.peak_bytes:.0%}, "
      f"activations {m.activations_bytes / m.peak_bytes:.0%}")

# %% [markdown]
# The last line splits the peak into what was loaded (the weights) and what the call made: the KV cache and
# the activations, the memory that lives only while the call runs.
#
# ## Step 2: the batch
#
# The usual advice for an OOM is "use a smaller batch". Batching multiplies every activation and the KV cache
# by the batch, and leaves the weights alone. The prefill (the first forward pass, over the whole prompt) makes
# the largest tensors; the decode steps that follow add one token each. So the runs below generate a single
# token (prefill only), measured without a budget to see each peak in full. The original's `chat()` answers one
# prompt; for several at once its own `generate` runs on the prompts stacked, the call `chat()` makes for one.
# First the check that prefill alone reaches the peak of the whole caption:

# %%
from xcomp_lab.lessons.sequence import default_prompt

records = {}


def sweep(model, step, kind, prompt, batch):
    """Prefill-only caption of `batch` prompts shaped `prompt`, recorded as 04-<kind>-<prompt.name>-b<batch>."""
    p = dataclasses.replace(params, image_size=prompt.image_size_parameter, batch_size=batch, max_new_tokens=1)
    images = batch_of_images(dataclasses.replace(p, batch_size=batch * prompt.images))
    run, rec = run_step(dataclasses.replace(step, name=f"04-{kind}-{prompt.name}-b{batch}"), model, tokenizer,
                        images, p, budget=None, extra={"image_size": prompt.image_size, "batch": batch},
                        images_per_prompt=prompt.images)
    records[(kind, prompt, batch)] = record(p, rec)
    return run


default = default_prompt(cfg, params.image_size)
runs = {(first_kind, default, params.batch_size): sweep(model, step, first_kind, default, params.batch_size)}
prefill_peak = runs[(first_kind, default, params.batch_size)].memory.peak_bytes
caption_over_prefill = first_run.memory.peak_bytes / prefill_peak
print(f"whole caption ({first_run.new_tokens} new tokens, batch {params.batch_size}) peak "
      f"{fmt_bytes(first_run.memory.peak_bytes)} | prefill only, same batch: {fmt_bytes(prefill_peak)} | "
      f"x{caption_over_prefill:.3f}: "
      + ("the prefill sets the caption's peak" if caption_over_prefill < 1.01 else "decoding adds to the prefill's peak"))

# %% [markdown]
# The ratio and its verdict say whether a prefill-only run measures the caption's peak. Now two and four
# images at once:

# %% [markdown]
# **Exercise 4.1: predict, then measure.** Before running the next cell: the usual advice says four images take
# four times the memory of one. Predict the peak at batch 4 as a multiple of the peak at batch 1 just measured:
# a plain number. Write it into `my_batch4_peak_x`; the cell after the batch runs compares it with this run, and
# `answer_4_1.solution()` shows the worked reasoning.

# %%
my_batch4_peak_x = None  # your prediction: peak at batch 4 / peak at batch 1

# %%
for batch in (1, 2, 4):
    if (first_kind, default, batch) not in runs:
        runs[(first_kind, default, batch)] = sweep(model, step, first_kind, default, batch)
one = runs[(first_kind, default, 1)].memory
for batch in (1, 2, 4):
    m = runs[(first_kind, default, batch)].memory
    made, made_one = m.activations_bytes + m.kv_cache_bytes, one.activations_bytes + one.kv_cache_bytes
    print(f"batch {batch} | peak {fmt_bytes(m.peak_bytes):>10s} (x{m.peak_bytes / one.peak_bytes:.2f}) | "
          f"activations + KV {fmt_bytes(made):>10s} (x{made / made_one:.2f}) | weights {fmt_bytes(m.weights_bytes)}")
print(f"the weights are {one.weights_bytes / one.peak_bytes:.0%} of the batch-1 peak: no batch size removes them")

# %%
from xcomp_lab.course.exercises import check

answer_4_1 = check("4.1", my_batch4_peak_x,
                   measured=runs[(first_kind, default, 4)].memory.peak_bytes / one.peak_bytes,
                   one=one, four=runs[(first_kind, default, 4)].memory)

# %% [markdown]
# What the call makes is made per image, so it grows with the batch; the peak grows less, because the weights
# do not change. A smaller batch helps exactly as much as the activations weigh against the weights (the last
# line above), and cannot help an OOM that happens with one image, like the one notebook 01 reproduced.
#
# ## Step 3: count the tokens an image brings
#
# The vision tower cuts the image into 14 px patches, one token each: (side / 14)² tokens. It was trained at
# one size; at another, its position embeddings are interpolated to the new grid (`interpolate_pos_encoding`),
# so the same model takes bigger images and gives more tokens. The tiny tower was trained at 112 px; the full
# model runs CLIP at 490 px. The original's code takes no image size: its `chat()` resizes every image to the
# side its config names, so its prompt grows by images instead, one placeholder each in the query, up to the
# prompt length its `chat()` keeps (`max_length`). The first lines below say which case this model is.

# %%
from xcomp_lab.lessons.sequence import prompt_shapes, scale_shapes

scales = scale_shapes(model)  # both scales of this model's code: tiny and full, or the original's small and full
full_cfg = scales["full"]
text_tokens = first_run.prompt_tokens - n_image
shapes = prompt_shapes(cfg, text_tokens)
if cfg.fixed_image_size:
    print(f"the original's chat() resizes every image to its config's img_size, {cfg.image_size} px, and takes no "
          f"image_size; it cuts a prompt at max_length = {cfg.max_prompt_tokens} tokens: "
          f"{shapes[-1].images} images of {n_image} tokens fit beside the {text_tokens} text tokens")
for s in shapes:
    side = s.image_size // cfg.patch_size
    grid = f"{side}x{side}" if s.images == 1 else f"{s.images} x {side}x{side}"
    print(f"{s.describe()} -> {grid} = {s.images * image_tokens(cfg, s.image_size):5d} image tokens, "
          f"prompt {s.tokens(cfg, text_tokens):5d} tokens")
print(f"full model at {full_cfg.image_size} px -> {image_tokens(full_cfg):5d} image tokens")
more = [s for s in shapes if s.images * image_tokens(cfg, s.image_size) > text_tokens]
print(f"the image tokens outnumber the {text_tokens} text tokens from {more[0].describe().strip()} on" if more else
      f"the {text_tokens} text tokens outnumber the image tokens at every size here")

# %% [markdown]
# Tripling the side multiplies the image tokens by nine, a second image adds as many as the first; the last line
# says from which prompt the images make most of it.

# %% [markdown]
# **Exercise 4.2: predict, then measure.** Step 4 captions one prompt of each row of the table above (prefill
# only). From the shortest prompt to the longest, the prompt grows by the factor the table shows. Predict how many
# times the activations grow over the same span, with the attention this notebook loaded (eager unless you
# changed `attn_implementation`): a plain number. Write it into `my_activation_growth_x`; the cell after Step 4
# compares it with this run, and `answer_4_2.solution()` shows the worked reasoning.

# %%
my_activation_growth_x = None  # your prediction: activations at the largest size / at the smallest

# %% [markdown]
# ## Step 4: grow the prompt and watch the peak
#
# One prefill-only run per row of the table, still with eager attention:

# %%
for s in shapes:
    if (first_kind, s, 1) not in runs:
        runs[(first_kind, s, 1)] = sweep(model, step, first_kind, s, 1)
rotary_positions = model.model.layers[0].attention.rotary_emb.max_seq_len_cached
for s in shapes:
    run = runs[(first_kind, s, 1)]
    m = run.memory
    print(f"{s.describe()} | {run.prompt_tokens:5d} tokens | peak {fmt_bytes(m.peak_bytes):>10s} | activations "
          f"{fmt_bytes(m.activations_bytes):>10s} | one layer's scores {fmt_bytes(eager_scores_bytes(cfg, 1, run.prompt_tokens)):>10s}"
          f" | {'within' if m.peak_bytes <= budget.limit_bytes else 'OVER'} the budget")
short, long = runs[(first_kind, shapes[0], 1)], runs[(first_kind, shapes[-1], 1)]
prompt_growth = long.prompt_tokens / short.prompt_tokens
activation_growth = long.memory.activations_bytes / short.memory.activations_bytes
print(f"prompt x{prompt_growth:.2f}, activations x{activation_growth:.2f} = x{activation_growth / prompt_growth:.2f} "
      f"the prompt's growth: " + ("faster than the prompt, so a term that grows with T² weighs"
                                  if activation_growth > 1.25 * prompt_growth else
                                  "about as the prompt, so the terms that grow with T make the activations"))
if rotary_positions > model.config.max_position_embeddings:
    print(f"the {long.prompt_tokens}-token prompt passed the {model.config.max_position_embeddings} positions of the rotary tables: "
          f"every layer rebuilt them for {rotary_positions} positions (dynamic NTK), as the original does")
else:
    print(f"the rotary tables cover all {long.prompt_tokens} positions: nothing was rebuilt")

# %%
answer_4_2 = check("4.2", my_activation_growth_x, measured=activation_growth,
                   short_tokens=short.prompt_tokens, long_tokens=long.prompt_tokens,
                   scores_bytes=eager_scores_bytes(cfg, 1, long.prompt_tokens),
                   logits_bytes=logits_peak_bytes(cfg, 1, long.prompt_tokens))

# %% [markdown]
# The scores grow with T², the hidden states, the MLP's activations and the logits with T: the activations
# grow faster than the prompt only where the scores are the larger part, and the growth line says which case
# this run is. Step 6 measures the parts one by one. When a prompt passes the positions of the rotary tables
# (`max_position_embeddings` in the configuration), the original's code rebuilds the tables of every layer at
# a stretched base (dynamic NTK), which costs memory and changes the positions it encodes, and so does the
# replica; the last line says whether that happened here.
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
# The original's code may not take it: the first lines below read its attention code and ask the course's
# check, and where sdpa is refused the rest of this step runs eager attention only. Which kernels really run
# depends on the machine, so look: one prefill pass under each attention, with the ATen kernels it called.

# %%
from xcomp_lab.lessons.sequence import attention_code, attention_kernels, attention_refusal

sdpa_step = STEPS["fp16-sdpa"]
print(sdpa_step.describe())
print(attention_code(model))
refused = attention_refusal(sdpa_step, params)
kernels = {first_kind: attention_kernels(model, tokenizer, images, params.device)}
if refused:
    print(f"not loaded: {refused}")
    second_kind = None
else:
    del model  # before loading the next: at full scale two models may not fit together
    gc.collect()
    if params.device == "cuda":
        torch.cuda.empty_cache()
    model, tokenizer = load_for_step(sdpa_step, params)
    second_kind = attention_kind(model)
    kernels[second_kind] = attention_kernels(model, tokenizer, images, params.device)
for kind, ops in kernels.items():
    print(f"{kind:6s} ran: {', '.join(f'{name} x{n}' for name, n in ops.items())}")
unfused = {kind: any("bmm" in name or "softmax" in name for name in ops) for kind, ops in kernels.items()}
print(f"{first_kind}: " + ("bmm and softmax: the scores exist as a tensor" if unfused[first_kind]
                           else "no bmm and no softmax"))
if second_kind:
    print(f"{second_kind}: " + ("bmm and softmax again: this machine fell back to the unfused math path"
                                if unfused[second_kind] else
                                "a fused kernel, no bmm and no softmax: the scores never exist as a tensor"))

# %% [markdown]
# Eager attention runs two batched matmuls and a softmax per layer: the scores exist as a tensor. A fused sdpa
# kernel replaces all three, and its name says which one PyTorch picked on this machine (flash,
# memory-efficient, cuDNN; the unfused math fallback would show bmm and softmax again). Now the same caption
# and the same prompts under sdpa, where it loaded:

# %%
second_run = None
if second_kind:
    second_run, second_record = run_step(sdpa_step, model, tokenizer, images, params, budget)
    record(params, second_record)
    for s in shapes:
        runs[(second_kind, s, 1)] = sweep(model, sdpa_step, second_kind, s, 1)

# %%
from xcomp_lab.lessons.sequence import peak_vs_tokens_chart

kinds = [kind for kind in (first_kind, second_kind) if kind]
series = {kind: [(runs[(kind, s, 1)].prompt_tokens, runs[(kind, s, 1)].memory.peak_bytes) for s in shapes]
          for kind in kinds}
code = "original code" if params.original_code else "replica"
peak_vs_tokens_chart(series, budget_bytes=budget.limit_bytes, weights_bytes=first_run.memory.weights_bytes,
                     title=f"FP16 prefill, {params.scale} {code} on {params.device}: {' vs '.join(kinds)}")

# %% [markdown]
# The lines start from the weights. Where both kinds ran, how far apart they are at each prompt length, against
# one layer's scores tensor:

# %%
gaps = {}
for s in shapes if second_kind else ():
    eager_m, sdpa_m = runs[(first_kind, s, 1)].memory, runs[(second_kind, s, 1)].memory
    tokens = runs[(first_kind, s, 1)].prompt_tokens
    gaps[s] = eager_m.peak_bytes - sdpa_m.peak_bytes
    scores = eager_scores_bytes(cfg, 1, tokens)
    print(f"{tokens:5d} tokens | {first_kind} - {second_kind} peak {fmt_bytes(gaps[s]):>10s} | scores B x H x T x T in FP16 "
          f"{fmt_bytes(scores):>10s} | x{gaps[s] / scores:.2f}")
if not second_kind:
    print(f"{first_kind} only: no gap to measure; Step 6 weighs the {first_kind} peak's terms one by one")

# %% [markdown]
# Where sdpa lowers the peak, the gap is a few of these tensors; where it does not, something else sets the
# peak. The next step finds what.
#
# ## Step 6: find what sets the peak: one layer's attention against the logits
#
# Two transient terms compete. At its softmax, eager attention holds a few tensors of one layer's scores
# shape (the masked scores, their FP32 softmax, its cast back to FP16), sdpa hardly any. At the end of the
# prefill, the output head writes the logits of every position in FP16 and the original's forward upcasts them
# to FP32 (`logits.float()`), both alive at once: batch x T x vocab x (2 + 4) bytes. Each is freed before the
# next layer or step, so the larger one should set the peak, on top of the weights, the KV cache and the hidden
# states; the gaps of Step 5 test that. First the logits at the longest prompt, measured in plain PyTorch:

# %%
from xcomp_lab.memory import measure

tokens = long.prompt_tokens
hidden = torch.zeros(1, tokens, cfg.hidden_size, dtype=model.dtype, device=model.device)  # the last layer's output
if params.device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        logits = model.output(hidden).float()  # the forward's last line: the head, then the FP32 upcast
    logits_peak = torch.cuda.max_memory_allocated() - before
    how = "torch.cuda.max_memory_allocated() - memory_allocated() before: the CUDA allocator's own peak"
else:
    with measure("cpu") as meter, torch.inference_mode():
        logits = model.output(hidden).float()
    logits_peak = meter.result.peak_bytes - meter.result.start_bytes
    how = "the course's tensor accounting (xcomp_lab.memory.measure): a CPU keeps no allocator statistics"
del logits, hidden
formula = logits_peak_bytes(cfg, 1, tokens)
print(f"measured with {how}")
print(f"head + FP32 upcast at {tokens} tokens: {fmt_bytes(logits_peak)} | formula 1 x {tokens} x {cfg.vocab_size} x (2 + 4) B "
      f"= {fmt_bytes(formula)} | x{logits_peak / formula:.2f}")

# %% [markdown]
# The ratio says how well the formula counts what the head makes. `measure_peak_terms` repeats that
# measurement with `xcomp_lab.memory.measure` (the same allocator calls on CUDA, the tensor accounting on a
# CPU), on one layer's eager and sdpa attention too, at every prompt length of Step 4; each row then reads the
# measured gap between the two peaks against them:

# %%
from xcomp_lab.lessons.sequence import measure_peak_terms, peak_setter

terms = {s: measure_peak_terms(model, runs[(first_kind, s, 1)].prompt_tokens, device=params.device,
                                image_tokens=s.images * image_tokens(cfg, s.image_size))
         for s in shapes}
for s, t in terms.items():
    print(t.line())
    print(f"{'':5s}        -> {peak_setter(t, gaps.get(s), runs[(first_kind, s, 1)].memory.activations_bytes)}")

# %% [markdown]
# Where one layer's eager attention holds more than the logits, it sets the eager peak and sdpa, which does not
# hold the scores, lowers it; where the logits hold more, they set both peaks, and sdpa, which still never stores
# the scores, saves nothing at the peak. (The original's row measures its whole attention module, its packed
# projections included.) Which case a model is in depends on its shape: per prompt token the
# logits take vocab x 6 bytes, one layer's eager attention k x heads x T x 2 bytes, with k the multiple just
# measured. The scores catch up with the logits at T* = 3 x vocab / (k x heads) tokens. Both configurations of
# this model's code, with this run's k, and the prompts this notebook runs at each scale:

# %%
from xcomp_lab.lessons.sequence import crossover_tokens

k = max(t.eager_multiple for t in terms.values())
small_name, full_name = scales  # "tiny" and "full", or the original's "small" build and "full" released model
verdicts = {}
for name, c in scales.items():
    t_star = crossover_tokens(c, k)
    prompts = [s.tokens(c, text_tokens) for s in prompt_shapes(c, text_tokens)]
    verdicts[name] = ("the scores" if min(prompts) > t_star else "the logits" if max(prompts) < t_star
                      else "the scores past T*, the logits below it")
    print(f"{name:4s} | vocab {c.vocab_size:6,d} | {c.num_attention_heads:2d} heads x {c.head_dim} = hidden {c.hidden_size:4d} | "
          f"T* = {t_star:6.0f} tokens | prompts {min(prompts)}-{max(prompts)} tokens: {verdicts[name]} outweigh")
print("the two scales " + (f"disagree: {verdicts[small_name]} set the {small_name} model's eager peak, "
                           f"{verdicts[full_name]} the {full_name} model's"
                           if verdicts[small_name] != verdicts[full_name]
                           else f"agree: {verdicts[small_name]} set both eager peaks"))
full_prompt = text_tokens + image_tokens(full_cfg)
print(f"full model at {full_prompt} tokens: logits {fmt_bytes(logits_peak_bytes(full_cfg, 1, full_prompt))}, one layer's "
      f"scores {fmt_bytes(eager_scores_bytes(full_cfg, 1, full_prompt))} (x{k:.1f}: "
      f"{fmt_bytes(k * eager_scores_bytes(full_cfg, 1, full_prompt))}), by the formulas")

# %% [markdown]
# The vocabulary sets the logits and the heads set the scores. A large vocabulary against few heads pushes T*
# up; the lines above give each model's T* and where its prompts fall, so this is where the small and the full
# editions of this notebook part ways when they do. Generation reads the logits of the last position only:
# computing just those would remove that term (Question 3).
#
# ## Step 7: the KV cache, predicted and measured
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
kv_rows = [(f"{kind} caption", run, params.batch_size, steps_of(run))
           for kind, run in ((first_kind, first_run), (second_kind, second_run)) if run is not None]
kv_rows += [(f"{kind} {prompt.describe().strip()} batch {batch}", run, batch, 1)
            for (kind, prompt, batch), run in runs.items()]
width = max(24, *(len(name) for name, *_ in kv_rows))
for name, run, batch, steps in kv_rows:
    tokens = run.prompt_tokens + steps - 1
    predicted = kv_cache_formula(cfg, batch, tokens, model.dtype)
    print(f"{name:{width}s} | {batch} x {tokens:4d} tokens | predicted {fmt_bytes(predicted):>10s} | measured "
          f"{fmt_bytes(run.memory.kv_cache_bytes):>10s} | x{run.memory.kv_cache_bytes / predicted:.2f}")
kv_full = kv_cache_formula(full_cfg, 1, full_prompt + params.max_new_tokens - 1, "float16")
print(f"full model, one {full_cfg.image_size} px caption in FP16: {fmt_bytes(kv_full)} by the formula")
if params.original_code:
    longest = records[(first_kind, shapes[-1], 1)]
    held, kv = longest["extra"]["kv_storage_bytes"], longest["kv_cache_bytes"]
    print(f"the original's tuple cache at {runs[(first_kind, shapes[-1], 1)].prompt_tokens} tokens keeps "
          f"{fmt_bytes(held)} of storage alive for its {fmt_bytes(kv)} of keys and values (x{held / kv:.2f}): "
          f"each layer's values are a view of its packed wqkv output (notebook 07)")

# %% [markdown]
# The ratios say how closely the formula predicts the cache. By the formula it grows in a straight line with
# tokens and batch, never with T², and it lives for the whole caption, while each layer's scores are freed as
# soon as the layer ends. With the original's code the last line adds what its cache keeps alive beyond them.
#
# ## What we learned

# %%
fk, sk = first_kind, second_kind
lo, hi = shapes[0], shapes[-1]
t_lo, t_hi = runs[(fk, lo, 1)].prompt_tokens, runs[(fk, hi, 1)].prompt_tokens
growth = {kind: runs[(kind, hi, 1)].memory.activations_bytes / runs[(kind, lo, 1)].memory.activations_bytes
          for kind in kinds}
b4 = runs[(fk, default, 4)].memory
kv_ratios = [run.memory.kv_cache_bytes / kv_cache_formula(cfg, b, run.prompt_tokens + n - 1, model.dtype)
             for _, run, b, n in kv_rows]
top = terms[hi]
fits = {kind: "exceeds" if runs[(kind, hi, 1)].memory.peak_bytes > budget.limit_bytes else "stays within"
        for kind in kinds}
print(f"- From {lo.describe().strip()} to {hi.describe().strip()} the prompt grows from {t_lo} to {t_hi} tokens "
      f"(x{t_hi / t_lo:.1f}); activations grow " + " and ".join(f"x{growth[kind]:.1f} with {kind}" + (" attention" if kind == fk else "")
                                                                 for kind in kinds) + ".")
print(f"- At {t_hi} tokens one layer's {fk} attention holds {fmt_bytes(top.eager_bytes)}, the logits {fmt_bytes(top.logits_bytes)}; "
      f"{peak_setter(top, gaps.get(hi), runs[(fk, hi, 1)].memory.activations_bytes)}. The scores overtake the logits at {crossover_tokens(cfg, k):.0f} tokens at this "
      f"scale (" + ", ".join(f"{crossover_tokens(c, k):.0f} {name}" for name, c in scales.items()) + ").")
print(f"- At {t_hi} tokens the {fk} peak {fits[fk]} the budget" + (f", the {sk} peak {fits[sk]} it." if sk else
                                                                    f"; no {sdpa_step.attn_implementation} run: this code's "
                                                                    f"load refuses it (Step 5)."))
print(f"- Batch 4 multiplies the peak by {b4.peak_bytes / one.peak_bytes:.2f} and what the call makes by "
      f"{(b4.activations_bytes + b4.kv_cache_bytes) / (one.activations_bytes + one.kv_cache_bytes):.2f}: "
      f"a smaller batch saves activations, never weights.")
print(f"- The KV cache formula against every measurement: ratios {min(kv_ratios):.2f} to {max(kv_ratios):.2f}; "
      f"a {full_cfg.image_size} px caption of the full model needs {fmt_bytes(kv_full)} of it in FP16.")

# %% [markdown]
# **Questions.** (1) At what prompt length would one layer's FP32 softmax of the full model (32 heads) reach
# 1 GiB, and which image size (with the original's code: how many images) gives that many tokens? (2) Why does grouped-query attention shrink the KV cache
# but not the eager scores? (3) If the forward computed the logits of the last position only, where would the
# full model's peak move, and would sdpa then lower it? (4) Which would you change first for a 2-image prompt on
# a tight card: attention kind, batch or image size, and by how much would each lower the peak?
