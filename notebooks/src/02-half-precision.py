# %% [markdown]
# # 02 · Half precision halves the weights, but `.half()` after an FP32 load pays for the FP32 model first
#
# Three ways to run InternLM-XComposer2-VL in 16 bits: load FP32 and call `.half()`, ask for
# `dtype=torch.float16` at load, or ask for `dtype=torch.bfloat16`. Here we measure for each the memory while
# loading, the weights it keeps, the peak of a caption, its speed, and how far its captions and logits drift
# from the FP32 model's.

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
# **Prediction.** By *params x bytes per param*, 16 bits halve the weights (the first cell below prints the
# arithmetic for the model loaded here). FP16 keeps 10 mantissa bits and 5 exponent bits, BF16 keeps FP32's 8
# exponent bits but only 7 mantissa bits: both round every weight, so answers may drift. And `.half()` can only
# convert a model that already exists in FP32: while loading, that path needs the FP32 model first.
#
# ## Step 1: load the FP32 reference and measure the load
#
# Every comparison needs a reference: the FP32 model, loaded as in notebook 01 (`dtype=torch.float32`). The
# load itself is measured. On a GPU the allocator sees every byte the load allocates, so its peak is printed;
# on a CPU the course's tensor accounting only sees tensors made by PyTorch operations, and safetensors creates
# the loaded tensors straight from the file, so on a CPU only the weights resident before and after are exact.

# %%
import torch
from xcomp_lab.lessons.precision import measure_cast, measure_load, fp32_reference, drift_line, free, run_precision_step
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.core.units import fmt_bytes

fp32_step = STEPS["fp32-no-autocast"]
(model, tokenizer), fp32_load = measure_load(lambda: load_for_step(fp32_step, params), params.device,
                                             label="dtype=torch.float32 at load")
n_params = sum(p.numel() for p in model.parameters())
fp32_params = sum(p.numel() * p.element_size() for p in model.parameters())
budget = course_budget(params, model.config)
print(fp32_load)
print(f"{n_params:,} parameters x 4 bytes = {fmt_bytes(n_params * 4)} | parameters measured {fmt_bytes(fp32_params)} "
      f"| buffers (rotary tables) {fmt_bytes(fp32_load.after_bytes - fp32_params)}")
print(f"prediction for 16 bits: {n_params:,} x 2 bytes = {fmt_bytes(n_params * 2)} of parameters, "
      f"{fmt_bytes(fp32_load.after_bytes / 2)} with the buffers")

# %% [markdown]
# The resident weights are the parameter count times 4 bytes plus the buffers the count misses (the rotary
# tables of notebook 00); the last line is what every 16-bit model below should keep.
#
# Now the reference itself: greedy captions of a held-out subset of scenes the model never saw in training, and
# the prefill logits (the scores of every vocabulary entry at every prompt position) of the first few prompts.

# %%
from xcomp_lab.data.quality import quality_report

n_eval, n_logits = 8, 2  # held-out scenes captioned by every model; prompts whose logits are compared
reference = fp32_reference(model, tokenizer, n=n_eval, n_logits=n_logits, max_new_tokens=params.max_new_tokens,
                           image_size=params.image_size)
fp32_quality = quality_report(reference.captions, reference.truths)
images = batch_of_images(params)  # what the measured captioning calls caption
print(f"FP32 captions: exact match {fp32_quality.exact_match:.0%} of {fp32_quality.n} held-out scenes")
print(f"first scene | truth: {reference.truths[0]!r} | FP32: {reference.captions[0]!r}")

# %% [markdown]
# That is the quality every 16-bit model is held to: its captions are scored against the truth and against
# these FP32 captions, its logits against these FP32 logits.
#
# Speed is timed outside any memory measurement (the CPU accounting slows every operation), with the same work for
# every model: the prefill (one forward pass over the prompt, big matrix products) and a generation of exactly
# `max_new_tokens` tokens (one token at a time, where per-step overhead weighs as much as arithmetic at tiny scale).
# On a CPU the timing runs on one thread: with more, other processes on a shared machine stall PyTorch's thread
# pool and the figures swing tenfold.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.run.speed import generation_speed


def speed_of(step):
    return generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                            image_size=params.image_size, repeats=2, use_autocast=step.use_autocast)


def versus_fp32(name):
    s, f = speeds[name], speeds["FP32"]
    return (f"{name} against FP32: prefill x{s.prefill_tokens_per_s / f.prefill_tokens_per_s:.2f}, "
            f"generation x{s.tokens_per_s / f.tokens_per_s:.2f}")


speeds = {"FP32": speed_of(fp32_step)}
print(f"FP32: {speeds['FP32']}")

# %% [markdown]
# Then one measured captioning call in FP32, without autocast (notebook 01's first fix), for the comparison:

# %%
from xcomp_lab.lessons.precision import load_extra, with_speed

fp32_run, fp32_record = run_step(fp32_step, model, tokenizer, images, params, budget,
                                 extra={**fp32_quality.as_dict(), **load_extra(fp32_load)})
fp32_record = record(params, with_speed(fp32_record, speeds["FP32"]))

# %% [markdown]
# It fits, as in notebook 01: FP32 weights plus a few activations, without autocast's copies.

# %% [markdown]
# **Exercise 2.1: predict, then measure.** 16 bits halve the weights. Do they halve the peak of a caption? Predict
# the peak of the same caption with FP16 weights (measured in Step 2) as a multiple of the FP32 caption's peak
# just printed: a plain number, 0.5 for half. Write it into `my_fp16_peak_x`; the cell after the FP16 caption
# compares it with this run, and `answer_2_1.solution()` shows the worked reasoning.

# %%
my_fp16_peak_x = None  # your prediction: FP16 caption peak / FP32 caption peak

# %% [markdown]
# ## Step 2: `.half()` after loading FP32
#
# The quick fix most people try: keep the quick start's load and convert afterwards. `.half()` walks the model
# tensor by tensor, making an FP16 copy of each and dropping the FP32 original, so the FP32 model must be there
# in full when it starts. On a GPU, where the quick start's `.cuda()` already put the FP32 model, that is GPU
# memory; with `.half().cuda()` it is host memory instead. Here the cast runs where the model is
# (`params.device`).

# %%
half_step = STEPS["fp16-half"]
print(half_step.describe())
model, half_cast = measure_cast(model, torch.float16, params.device, label=".half()")  # model.half()  <- changed line
half_load_peak = max(fp32_load.peak_or_lower_bound, half_cast.peak_or_lower_bound)
print(half_cast)
print(f"peak while loading by this path: {'' if half_cast.peak_bytes is not None else 'at least '}"
      f"{fmt_bytes(half_load_peak)} = {half_load_peak / half_cast.after_bytes:.2f} x the FP16 weights it keeps")

# %% [markdown]
# The weights halve, but the path through FP32 needed about twice what it keeps (on a GPU the printed peak is
# the allocator's; on a CPU it is the FP32 model that existed before the cast, a floor for the true peak).

# %% tags=["nbval-ignore-output"]
speeds[".half()"] = speed_of(half_step)
print(f".half(): {speeds['.half()']}\n{versus_fp32('.half()')}")

# %% [markdown]
# The factors compare with FP32 on the same device and the same work. On a GPU, 16-bit matrix products run on the
# tensor cores; on a CPU without 16-bit matrix instructions they are converted on the fly, which costs time, most
# visibly in the prefill. The factors printed above say which case this machine is (timings on a shared machine
# are noisy).
#
# Now the same measured caption as in Step 1, with the quick start's settings (`no_grad` and autocast), and the
# drift from FP32:

# %%
half = run_precision_step(half_step, model, tokenizer, images, params, budget, reference, half_cast,
                          load_peak_bytes=half_load_peak, speed=speeds[".half()"])
record(params, half.record)
print(drift_line(half.drift.report))

# %%
from xcomp_lab.course.exercises import check

answer_2_1 = check("2.1", my_fp16_peak_x, measured=half.run.memory.peak_bytes / fp32_run.memory.peak_bytes,
                   fp32=fp32_run.memory, fp16=half.run.memory)

# %% [markdown]
# The caption's peak now sits on FP16 weights; the drift line says how many captions still match FP32's and how
# far the logits moved (mean and worst position, and how often the top-scoring token is the same).
#
# ## Step 3: `dtype=torch.float16` at load
#
# Asking `from_pretrained` for FP16 (the released weights' own dtype) builds the model in FP16 from the start:
# no FP32 copy ever exists. The previous model is freed first, so the GPU measurement starts from an empty card.

# %%
del model
free(params.device)
fp16_step = STEPS["fp16"]
print(fp16_step.describe())
(model, tokenizer), fp16_load = measure_load(lambda: load_for_step(fp16_step, params), params.device,
                                             label="dtype=torch.float16 at load")  # <- changed line
print(fp16_load)

# %% [markdown]
# The weights the `.half()` path kept, without the FP32 model on the way (on a CPU the line can only show the
# weights after the load).

# %% tags=["nbval-ignore-output"]
speeds["FP16"] = speed_of(fp16_step)
print(f"FP16: {speeds['FP16']}\n{versus_fp32('FP16')}")

# %% [markdown]
# Same weights and the same arithmetic as `.half()`: a gap between these speeds and those of `.half()` is the
# noise of timing on this machine.

# %%
fp16 = run_precision_step(fp16_step, model, tokenizer, images, params, budget, reference, fp16_load,
                          speed=speeds["FP16"])
record(params, fp16.record)
print(drift_line(fp16.drift.report))
print(f"same captions and logit figures as the .half() path: {fp16.drift.captions == half.drift.captions} and "
      f"{fp16.drift.report.logit_stats == half.drift.report.logit_stats}")

# %% [markdown]
# The released weights are FP16: loading them as FP32 is exact and `.half()` rounds them back exactly, so both
# paths should hold the same bits and answer alike; the last line checks captions and logits.
#
# ## Step 4: `dtype=torch.bfloat16` at load
#
# BF16 trades precision for range: FP32's exponent, so no value overflows where FP32 would not, but each weight
# is rounded more coarsely than in FP16. The released weights are FP16, so loading them as BF16 rounds them once
# more. The course runs BF16 without autocast (autocast would compute in FP16) and under `inference_mode`.

# %%
del model
free(params.device)
bf16_step = STEPS["bf16"]
print(bf16_step.describe())
(model, tokenizer), bf16_load = measure_load(lambda: load_for_step(bf16_step, params), params.device,
                                             label="dtype=torch.bfloat16 at load")  # <- changed line
print(bf16_load)

# %% [markdown]
# Same bytes as FP16.

# %% tags=["nbval-ignore-output"]
speeds["BF16"] = speed_of(bf16_step)
print(f"BF16: {speeds['BF16']}\n{versus_fp32('BF16')}")

# %% [markdown]
# BF16 needs no autocast and works on a CPU; whether it is faster than FP16 there depends on the CPU's
# instructions, printed with all the speeds in the last cell.

# %%
bf16 = run_precision_step(bf16_step, model, tokenizer, images, params, budget, reference, bf16_load,
                          speed=speeds["BF16"])
record(params, bf16.record)
print(drift_line(bf16.drift.report))
bf16_mean, fp16_mean = (r.drift.report.logit_stats["mean_abs_diff"] for r in (bf16, fp16))
print(f"BF16's mean |logit diff| from FP32 is "
      + (f"x{bf16_mean / fp16_mean:.1f} FP16's" if fp16_mean > 0 else f"{bf16_mean:.2g}, FP16's is 0"))

# %% [markdown]
# The last line compares the two roundings: how many times further BF16's coarser mantissa moves the logits
# from FP32 than FP16's does, and the drift line how often that changes a caption.

# %% [markdown]
# ## Step 5: compare the four side by side
#
# Peak while loading (on a CPU a floor, marked >=), weights kept, peak of one caption under the budget, and the
# drift: exact match against the true captions, then agreement with FP32's captions, top-1 agreement and largest
# difference of the prompt logits (the FP32 row is the reference itself).

# %%
rows = [("FP32", fp32_load, fp32_load.peak_or_lower_bound, fp32_run, fp32_quality)]
rows += [(name, r.load, peak, r.run, r.drift.report) for name, r, peak in (
    (".half()", half, half_load_peak), ("FP16 at load", fp16, fp16_load.peak_or_lower_bound),
    ("BF16 at load", bf16, bf16_load.peak_or_lower_bound))]
floor = "" if params.device == "cuda" else ">="
print(f"{'':13s} {'load peak':>13s} {'weights':>10s} {'caption peak':>13s} {'exact':>6s} {'=FP32':>6s} "
      f"{'top-1':>6s} {'max|diff|':>9s}")
for name, load, load_peak, run, q in rows:
    stats = q.logit_stats or {"top1_agreement": 1.0, "max_abs_diff": 0.0}
    agree = 1.0 if q.agreement_with_reference is None else q.agreement_with_reference
    print(f"{name:13s} {floor + fmt_bytes(load_peak):>13s} {fmt_bytes(load.after_bytes):>10s} "
          f"{fmt_bytes(run.memory.peak_bytes):>13s} {q.exact_match:6.0%} {agree:6.0%} "
          f"{stats['top1_agreement']:6.1%} {stats['max_abs_diff']:9.3g}")

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart([fp32_record, half.record, fp16.record, bf16.record], budget_bytes=budget.limit_bytes,
            title=f"FP32 and three ways to 16 bits ({params.scale}, {params.device})")

# %% [markdown]
# Each bar is one caption's peak: the weights at the bottom, then the KV cache and the activations; above it,
# the exact match on the held-out scenes.
#
# ## What we learned

# %%
del model
free(params.device)
fp16_weights = fp16.load.after_bytes
worst_top1 = min(r.drift.report.logit_stats["top1_agreement"] for r in (half, fp16, bf16))
print(f"- 16 bits keep {fmt_bytes(fp16_weights)} of weights against {fmt_bytes(fp32_load.after_bytes)} in FP32 "
      f"(x{fp16_weights / fp32_load.after_bytes:.2f}); a caption peaks at {fmt_bytes(fp16.run.memory.peak_bytes)} "
      f"against {fmt_bytes(fp32_run.memory.peak_bytes)}.")
print(f"- `.half()` after an FP32 load needs {'' if params.device == 'cuda' else 'at least '}"
      f"{fmt_bytes(half_load_peak)} while loading, x{half_load_peak / fp16_weights:.2f} what `dtype=torch.float16` "
      f"at load keeps: ask for the dtype in `from_pretrained`.")
print(f"- Against FP32: .half() and FP16 at load agree on {half.drift.report.agreement_with_reference:.0%} and "
      f"{fp16.drift.report.agreement_with_reference:.0%} of {n_eval} captions, BF16 on "
      f"{bf16.drift.report.agreement_with_reference:.0%}; the top-scoring token of the prompt logits matches at "
      f"{worst_top1:.1%} of positions or more.")

# %% tags=["nbval-ignore-output"]
cpu = torch.backends.cpu.get_cpu_capability()
where = torch.cuda.get_device_name(0) if params.device == "cuda" else f"CPU ({cpu})"
print(f"- Speed on {where}, prefill | generation: " + ", ".join(
    f"{name} {s.prefill_tokens_per_s:.0f} | {s.tokens_per_s:.1f} tokens/s" for name, s in speeds.items()) + ".")
for phase, speed in (("prefill", lambda s: s.prefill_tokens_per_s), ("generation", lambda s: s.tokens_per_s)):
    ratios = [speed(s) / speed(speeds["FP32"]) for name, s in speeds.items() if name != "FP32"]
    verdict = "faster" if min(ratios) > 1 else "slower" if max(ratios) < 1 else "neither faster nor slower throughout"
    print(f"- 16-bit {phase} runs at x{min(ratios):.2f} to x{max(ratios):.2f} FP32's speed here: {verdict}.")

# %% [markdown]
# **Questions.** (1) On a 24 GB card, which of the three paths can load the full model at all, and why does the
# order `.half().cuda()` change the answer? (2) BF16 rounds each weight more coarsely than FP16; why is it still
# the usual choice for training? (3) The logits move while most captions stay the same: which positions of a
# caption would you expect to flip first?
