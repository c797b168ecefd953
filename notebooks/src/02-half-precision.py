# %% [markdown]
# # 02 · Half precision: 16 bits halve the weights, and `.half()` after an FP32 load needs the FP32 model first
#
# Three ways to run InternLM-XComposer2-VL in 16 bits: load FP32 and call `.half()`, ask for
# `dtype=torch.float16` at load, or ask for `dtype=torch.bfloat16`. Here we measure for each the memory while
# loading, the weights it keeps, the peak of a caption, its speed, and how far its captions and logits drift
# from the FP32 model's; then the host RAM each way of loading needs before the model reaches the device.

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
# **Prediction.** By *params x bytes per param*, 16 bits halve the weights (the first cells below print the
# arithmetic for the model loaded here). FP16 keeps 10 mantissa bits and 5 exponent bits, BF16 keeps FP32's 8
# exponent bits but only 7 mantissa bits (IEEE 754 binary16; Google's bfloat16). A weight stored in FP16 is held
# exactly in FP16 and rounded in BF16; either way the arithmetic runs in 16 bits, so answers may drift. And
# `.half()` can only convert a model that already exists in FP32: while loading, that path needs the FP32 model
# first.
#
# ## Step 1: load the FP32 reference and measure the load
#
# Every comparison needs a reference: the FP32 model, loaded as in notebook 01 (`dtype=torch.float32`; the
# original's own code, under its transformers 4.33.2, takes `torch_dtype=torch.float32` and no
# `attn_implementation`, which its constructor refuses: `pretrained_keywords` gives each code its own). First
# the measurement in plain PyTorch. On a GPU the CUDA caching allocator counts every byte it hands out:
# `torch.cuda.reset_peak_memory_stats()` before the load, `torch.cuda.max_memory_allocated()` after it. On a CPU
# the counterpart is the course's tensor accounting (`xcomp_lab.memory.measure`, a `TorchDispatchMode` that
# counts the storage of every tensor an operation makes). The cell says which one ran.

# %%
import torch
from transformers import AutoModel
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons.precision import free
from xcomp_lab.memory.budget import resolve_device
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.memory.measure import measure
from xcomp_lab.model.loading import pretrained_keywords, resolve_checkpoint

path = resolve_checkpoint(params.model_name_or_path, params.scale)
fp32_kwargs = dict(trust_remote_code=True, **pretrained_keywords(path, torch.float32, params.attn_implementation))
print(f"from_pretrained(path, {', '.join(f'{k}={v!r}' for k, v in fp32_kwargs.items())})")
if params.device == "cuda":  # the CUDA allocator's own counters
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = AutoModel.from_pretrained(path, device_map={"": "cuda"}, **fp32_kwargs)
    plain_peak, plain_end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    counter = "CUDA allocator (torch.cuda.max_memory_allocated)"
else:  # the CPU counterpart: the course's tensor accounting
    with measure("cpu", label="FP32 load") as m:
        model = AutoModel.from_pretrained(path, **fp32_kwargs)
    plain_peak, plain_end = m.result.peak_bytes, m.result.end_bytes
    counter = "CPU tensor accounting (xcomp_lab.memory.measure)"
held = resident_bytes(model, resolve_device(params.device))  # "cuda" -> "cuda:0", as the tensors name it
print(f"{counter}: peak {fmt_bytes(plain_peak)} during the load, {fmt_bytes(plain_end)} at its end | "
      f"the model holds {fmt_bytes(held)} on {params.device}")
print(f"the counter saw {plain_end / held:.0%} of the model's bytes"
      + ("" if plain_end >= held else ": transformers makes the loaded tensors in a pool of worker threads, and "
         "the accounting watches only the thread it runs in, so it cannot measure a load"))
del model
free(params.device)

# %% [markdown]
# On a GPU the allocator's peak is the load's true peak on the device. On a CPU the last line says how much of the
# model the accounting saw, and why a load can escape it; the process's resident memory, which Step 5 measures,
# sees every load.
# `measure_load()` wraps the same idiom for every load below: on a GPU it reports the allocator's peak, on a CPU
# only the weights resident before and after, which are exact.

# %%
from xcomp_lab.lessons.precision import measure_cast, measure_load, fp32_reference, drift_line, run_precision_step
from xcomp_lab.lessons.precision import stored_dtypes
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step

fp32_step = STEPS["fp32-no-autocast"]
(model, tokenizer), fp32_load = measure_load(lambda: load_for_step(fp32_step, params), params.device,
                                             label="dtype=torch.float32 at load")
n_params = sum(p.numel() for p in model.parameters())
fp32_params = sum(p.numel() * p.element_size() for p in model.parameters())
budget = course_budget(params, model.config)
stored = stored_dtypes(path)
print(fp32_load)
if params.device == "cuda":
    print(f"measure_load's peak is the plain idiom's: {fp32_load.peak_bytes == plain_peak}")
buffer_kinds = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()})
print(f"{n_params:,} parameters x 4 bytes = {fmt_bytes(n_params * 4)} | parameters measured {fmt_bytes(fp32_params)} "
      f"| buffers {fmt_bytes(fp32_load.after_bytes - fp32_params)} ({', '.join(buffer_kinds)})")
print(f"prediction for 16 bits: {n_params:,} x 2 bytes = {fmt_bytes(n_params * 2)} of parameters, "
      f"{fmt_bytes(fp32_load.after_bytes / 2)} with the buffers")
print("the checkpoint stores: " + (", ".join(f"{dtype} {fmt_bytes(n)}" for dtype, n in stored.items())
                                   or "unknown (a hub id: no local file to read)"))

# %% [markdown]
# The resident weights are the parameter count times 4 bytes plus the buffers the count misses (named in the
# line: the rotary tables of notebook 00 among them); the second-to-last line is what every 16-bit model below should keep, and the last one
# what the checkpoint holds on disk, by dtype (read from its safetensors headers).
#
# Now the reference itself: greedy captions of a held-out subset of scenes the model never saw in training, and
# the prefill logits (the scores of every vocabulary entry at every prompt position) of the first few prompts.
# The course's full-scale checkpoint and its builds of the original's code hold random weights: their captions are
# noise, and every caption figure below says so when that is the case.

# %%
from xcomp_lab.data.quality import quality_report

random_weights = params.random_weights
n_eval, n_logits = 8, 2  # held-out scenes captioned by every model; prompts whose logits are compared
reference = fp32_reference(model, tokenizer, n=n_eval, n_logits=n_logits, max_new_tokens=params.max_new_tokens,
                           image_size=params.image_size)
fp32_quality = quality_report(reference.captions, reference.truths)
images = batch_of_images(params)  # what the measured captioning calls caption
print(f"FP32 captions: exact match {fp32_quality.exact_match:.0%} of {fp32_quality.n} held-out scenes"
      + (" (random weights: noise)" if random_weights else ""))
print(f"first scene | truth: {reference.truths[0]!r} | FP32: {reference.captions[0]!r}")

# %% [markdown]
# That is the quality every 16-bit model is held to: its captions are scored against the truth and against
# these FP32 captions, its logits against these FP32 logits.
#
# Speed is timed outside any memory measurement (the CPU accounting slows every operation), with the same work for
# every model: the prefill (one forward pass over the prompt, big matrix products) and a generation of exactly
# `max_new_tokens` tokens (one token at a time, where per-step overhead weighs as much as arithmetic at tiny scale).
# The original's code is timed on its own `chat()` prompt and its own `generate` (transformers 4.33.2's), held to
# the same number of tokens.
# On a CPU the timing runs on one thread, so that other processes on a shared machine do not stall PyTorch's
# thread pool in the middle of a timing.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.run.speed import generation_speed


def speed_of(step):
    return generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                            image_size=params.image_size, repeats=2, use_autocast=step.use_autocast)


def versus_fp32(name):
    s, f = speeds[name], speeds["FP32"]
    return (f"{name} against FP32: prefill x{s.prefill_tokens_per_s / f.prefill_tokens_per_s:.2f}, "
            f"generation x{s.tokens_per_s / f.tokens_per_s:.2f}"
            + (" (16-bit products computed in FP32: not this CPU's 16-bit speed)" if s.emulated_products else ""))


speeds = {"FP32": speed_of(fp32_step)}
print(f"FP32: {speeds['FP32']}")

# %% [markdown]
# Then one measured captioning call in FP32, without autocast (notebook 01's first fix), for the comparison:

# %%
from xcomp_lab.lessons.precision import load_extra, with_speed

fp32_run, fp32_record = run_step(fp32_step, model, tokenizer, images, params, budget,
                                 extra={**fp32_quality.as_dict(), **load_extra(fp32_load)})
fp32_record = record(params, with_speed(fp32_record, speeds["FP32"]))
print(f"the weights are {fp32_run.memory.weights_bytes / fp32_run.memory.peak_bytes:.0%} of this peak; the "
      f"budget is {budget.limit_bytes / fp32_run.memory.peak_bytes:.2f} x the peak")

# %% [markdown]
# The line above says whether it fits, and how much of the peak is the weights themselves.

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
# memory; with `.half().cuda()` it is host memory instead (Step 5 measures that). Here the cast runs where the
# model is (`params.device`).

# %%
half_step = STEPS["fp16-half"]
print(half_step.describe())
model, half_cast = measure_cast(model, torch.float16, params.device, label=".half()")  # model.half()  <- changed line
half_load_peak = max(fp32_load.peak_or_lower_bound, half_cast.peak_or_lower_bound)
half_buffers = {name: buffer.dtype for name, buffer in model.named_buffers()}  # .half() casts the buffers too
print(half_cast)
print(f"peak while loading by this path: {'' if half_cast.peak_bytes is not None else 'at least '}"
      f"{fmt_bytes(half_load_peak)} = {half_load_peak / half_cast.after_bytes:.2f} x the FP16 weights it keeps")

# %% [markdown]
# The last line is what this path costs: its peak while loading against the weights it keeps (on a GPU the
# allocator's peak; on a CPU the FP32 model that existed before the cast, a floor for the true peak).

# %% tags=["nbval-ignore-output"]
speeds[".half()"] = speed_of(half_step)
print(f".half(): {speeds['.half()']}\n{versus_fp32('.half()')}")

# %% [markdown]
# The factors compare with FP32 on the same device and the same work. On NVIDIA GPUs, FP16 matrix products run on
# the tensor cores since Volta, BF16 ones since Ampere; on a CPU, 16-bit arithmetic is fast only with the instructions for it
# (AVX512-FP16, AVX512-BF16, AMX), and otherwise the values are converted on the fly. The factors printed above
# are this machine's (timings on a shared machine are noisy), unless the line says the 16-bit products were
# computed in FP32: the original's code on a CPU runs them so (`xcomp_lab.original.matmul`), because ATen's
# 16-bit CPU kernels would take minutes per caption at its real widths; its factors then measure that detour.
#
# Now the same measured caption as in Step 1, with the quick start's settings (`no_grad` and autocast), and the
# drift from FP32:

# %%
half = run_precision_step(half_step, model, tokenizer, images, params, budget, reference, half_cast,
                          load_peak_bytes=half_load_peak, speed=speeds[".half()"])
record(params, half.record)
print(drift_line(half.drift.report, noise=random_weights))

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
# Asking `from_pretrained` for FP16 (the released weights' own dtype, per the model card) builds the model in
# FP16 from the start: no FP32 copy ever exists. The previous model is freed first, so the GPU measurement starts
# from an empty card.

# %%
del model
free(params.device)
fp16_step = STEPS["fp16"]
print(fp16_step.describe())
(model, tokenizer), fp16_load = measure_load(lambda: load_for_step(fp16_step, params), params.device,
                                             label="dtype=torch.float16 at load")  # <- changed line
print(fp16_load)
other_dtype = {name.rsplit(".", 1)[-1]: (buffer.dtype, half_buffers[name]) for name, buffer in model.named_buffers()
               if buffer.dtype != half_buffers[name]}  # buffers the model's code makes in a dtype of its own
print(f"the same bytes as the .half() path kept: {fp16_load.after_bytes == half_cast.after_bytes}"
      + "".join(f" (buffer {name}: {here} here, {there} after .half())" for name, (here, there) in other_dtype.items())
      + f" | peak while loading {'' if fp16_load.peak_bytes is not None else 'at least '}"
      f"{fmt_bytes(fp16_load.peak_or_lower_bound)} against {'' if half_cast.peak_bytes is not None else 'at least '}"
      f"{fmt_bytes(half_load_peak)} by .half()")

# %% [markdown]
# The last line compares the two paths: the bytes each keeps (`.half()` casts every floating buffer too, while a
# load in FP16 keeps any buffer the model's code makes in FP32, which the line names), and the peak each needed on
# the way (on a CPU both peaks are floors: the resident weights).

# %% tags=["nbval-ignore-output"]
speeds["FP16"] = speed_of(fp16_step)
print(f"FP16: {speeds['FP16']}\n{versus_fp32('FP16')}")
print(f"FP16 at load against .half(): prefill "
      f"x{speeds['FP16'].prefill_tokens_per_s / speeds['.half()'].prefill_tokens_per_s:.2f}, generation "
      f"x{speeds['FP16'].tokens_per_s / speeds['.half()'].tokens_per_s:.2f}")

# %% [markdown]
# When the two paths hold the same weights (the next cell checks), they run the same arithmetic: the last factor's
# distance from x1.00 is then the noise of timing on this machine.

# %%
fp16 = run_precision_step(fp16_step, model, tokenizer, images, params, budget, reference, fp16_load,
                          speed=speeds["FP16"])
record(params, fp16.record)
print(drift_line(fp16.drift.report, noise=random_weights))
print(f"same captions and logit figures as the .half() path: {fp16.drift.captions == half.drift.captions} and "
      f"{fp16.drift.report.logit_stats == half.drift.report.logit_stats}")

# %% [markdown]
# When the checkpoint stores FP16 (Step 1 printed what it stores), loading it as FP32 is exact and `.half()` rounds
# each value back to the same bits: both paths then hold the same weights and answer alike, which the last line
# checks on captions and logits.
#
# ## Step 4: `dtype=torch.bfloat16` at load
#
# BF16 trades precision for range: FP32's exponent, so no value overflows where FP32 would not, but each weight
# is rounded more coarsely than in FP16. A checkpoint stored in FP16 is rounded once more on the way to BF16.
# The course runs BF16 without autocast (autocast would compute in FP16) and under `inference_mode`. The original's
# `chat()` makes an image file into an FP32 tensor and its vision tower hands the features back in the image's
# dtype; for a model of that code, the next cell tries the quick start's call as it is.

# %%
del model
free(params.device)
bf16_step = STEPS["bf16"]
print(bf16_step.describe())
(model, tokenizer), bf16_load = measure_load(lambda: load_for_step(bf16_step, params), params.device,
                                             label="dtype=torch.bfloat16 at load")  # <- changed line
print(bf16_load)
print(f"the same bytes as FP16 at load: {bf16_load.after_bytes == fp16_load.after_bytes}")
if params.original_code:
    from xcomp_lab.lessons.precision import file_chat_line

    print(file_chat_line(bf16_step, model, tokenizer, images[0], params.device))

# %% tags=["nbval-ignore-output"]
speeds["BF16"] = speed_of(bf16_step)
print(f"BF16: {speeds['BF16']}\n{versus_fp32('BF16')}")

# %% [markdown]
# BF16 needs no autocast and works on a CPU (with the original's code, given its image as a BF16 tensor, as the
# line above says where it ran); whether it is faster than FP16 there depends on the CPU's instructions, printed
# with all the speeds in the last cell.

# %%
bf16 = run_precision_step(bf16_step, model, tokenizer, images, params, budget, reference, bf16_load,
                          speed=speeds["BF16"])
record(params, bf16.record)
print(drift_line(bf16.drift.report, noise=random_weights))
bf16_mean, fp16_mean = (r.drift.report.logit_stats["mean_abs_diff"] for r in (bf16, fp16))
print("BF16's mean |logit diff| from FP32 is "
      + (f"x{bf16_mean / fp16_mean:.1f} FP16's" if fp16_mean > 0 else f"{bf16_mean:.2g}, FP16's is 0"))

# %% [markdown]
# The last line compares the two roundings: how many times further BF16's coarser mantissa moves the logits
# from FP32 than FP16's does, and the drift line how often that changes a caption (with random weights, the
# logit figures measure rounding alone, and the caption figures nothing).
#
# ## Step 5: host RAM while loading
#
# Everything above is memory on the device. But a model is made in the host's RAM first unless `from_pretrained`
# sends each tensor to the device as it reads it (`device_map`), and the quick start loads with no `device_map`
# and moves the model with `.cuda()` afterwards: with `.half().cuda()`, the FP32 model sits whole in host RAM
# before the cast. A machine whose RAM holds the FP16 model but not the FP32 one would fail there, before any GPU
# figure above is reached. Host RAM is the process's resident set (RSS): its pages in RAM, its own memory and the
# files it has mapped (safetensors maps the checkpoint).
#
# The measurement in plain code, on Linux: writing `5` to `/proc/self/clear_refs` resets the kernel's high-water
# mark of the process's RSS (`VmHWM` in `/proc/self/status`, since Linux 4.0) to its current RSS, so after a load
# `VmHWM` is that load's peak, however briefly it lasted. Elsewhere, or where a sandbox refuses the write, the
# helper below samples the RSS from a thread instead (a floor for the peak). The model on the device is freed
# first.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.lessons.host_memory import compare_loads, host_peaks_chart, peak_method, release_freed

del model
free(params.device)
fp16_kwargs = dict(trust_remote_code=True, **pretrained_keywords(path, torch.float16, params.attn_implementation))


def status_bytes(field):  # a "kB" line of /proc/self/status, in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


if peak_method() == "VmHWM":
    release_freed()  # garbage collected, freed heap pages handed back: a baseline the process really holds
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    model = AutoModel.from_pretrained(path, **fp16_kwargs)  # dtype=torch.float16 at load, into host RAM
    print(f"dtype=torch.float16 at load: VmRSS {fmt_bytes(before)} before | VmHWM {fmt_bytes(status_bytes('VmHWM'))} "
          f"during the load | VmRSS {fmt_bytes(status_bytes('VmRSS'))} after, the model alive")
    del model
else:
    print(f"VmHWM cannot be reset here (peak method: {peak_method()}); the helper below samples the RSS instead")

# %% [markdown]
# The process itself (Python, PyTorch, transformers, and on a GPU the CUDA context) holds hundreds of MiB before
# any load (the table below prints how much), so each load is read as its rise above the RSS it started from. And
# a process that has already loaded and dropped models, like this notebook's, can reuse memory its allocator kept,
# which makes a load look cheaper than it is by an amount that depends on what ran before: `compare_loads()` therefore runs each load in a
# fresh Python process (forked from one that has imported torch and transformers and loaded nothing), as a
# learner's script would, with the idiom above inside it. Three loads, each plain `from_pretrained(path,
# trust_remote_code=True, **load)` with the dtype as the checkpoint's code takes it (`dtype=`, or `torch_dtype=` for
# the original's): (a) FP32, then `.half()` in host RAM; (b) `dtype=torch.float16`; (c) the same with
# `device_map={"": params.device}`, which sends each tensor to the device as it is read. They take turns,
# twice over: the spread of the repeats is the noise a difference has to stand out from.

# %% tags=["nbval-ignore-output"]
loads = {  # from_pretrained keywords as plain JSON, and the cast after the load ("then")
    "(a) FP32, then .half()": {"dtype": "float32", "then": "half"},
    "(b) float16 at load": {"dtype": "float16"},
    f"(c) float16, device_map {params.device}": {"dtype": "float16", "device_map": {"": params.device}},
}
for load in loads.values():
    load["attn_implementation"] = params.attn_implementation
host = compare_loads(path, loads, repeats=2)
print(host.table())

# %% tags=["nbval-ignore-output"]
host_peaks_chart(host, references={"FP16 weights": fp16_load.after_bytes, "FP32 weights": fp32_load.after_bytes},
                 title=f"Host RAM while loading ({params.scale}, {params.device})")

# %% [markdown]
# Each bar is a load's median peak above the RSS its process started from, the whiskers the range of its
# repeats, the narrow bar what the process still held when the load returned (the model alive), the diamond the
# sampled peak of its own (anonymous) memory; the lines are the model's FP16 and FP32 weights.
#
# Read the two kinds of memory apart. Pages mapped from a file are resident only once something reads them, and
# the kernel can drop them under pressure and read them again from the disk: a model loaded on the CPU in the
# checkpoint's own dtype can keep its weights in safetensors' memory map, read only as far as the load touched
# them, and a `device_map` load to a GPU reads every tensor through the map to copy it there. The process's own
# (anonymous) memory, such as an FP32 copy of the weights, has nowhere to go without swap: it is what the host
# must hold for the load. The lines below compare two loads only where the gap is over three times the noise of
# this run and over 5% of the larger figure; otherwise they say that this run cannot tell.

# %% tags=["nbval-ignore-output"]
half_path, fp16_path, map_path = loads
stored_bytes = sum(stored.values())
anon_known = host.anon_rise(half_path) is not None
print(f"- {host.difference(half_path, fp16_path).line()}")
if anon_known:
    print(f"- {host.difference(half_path, fp16_path, of='anon').line()}")
print(f"- {host.difference(map_path, fp16_path).line()}")
for name, rise in ((name, host.rise(name)) for name in (fp16_path, map_path) if stored_bytes):
    if rise >= stored_bytes:
        print(f"- {name} rose {fmt_bytes(rise)} for {fmt_bytes(stored_bytes)} of stored weights: the "
              f"{fmt_bytes(rise - stored_bytes)} beyond them ({rise / stored_bytes - 1:.0%} of the weights) is what a "
              f"fresh process's first load spends besides the weights.")
    else:
        print(f"- {name} rose {fmt_bytes(rise)}, less than its {fmt_bytes(stored_bytes)} of stored weights: the load "
              f"left at least {fmt_bytes(stored_bytes - rise)} of the checkpoint unread in its memory map, to be read "
              f"when the model first uses it.")
if params.original_code:
    from xcomp_lab.lessons.precision import hub_cached_dtypes
    from xcomp_lab.model.original import CLIP_REPO

    clip = sum(hub_cached_dtypes(CLIP_REPO).values())
    print(f"- The original's constructor first loads CLIP ({CLIP_REPO}) from the hub cache, {fmt_bytes(clip)} stored "
          f"there, before the checkpoint's own vit.* weights replace it: part of what a load of this code reads "
          f"besides the checkpoint.")
if params.device != "cpu":
    print(f"- (c) held {fmt_bytes(host.held(map_path))} of host RAM when it returned, its weights on {params.device}; "
          f"its peak of {fmt_bytes(host.rise(map_path))} was the load passing through.")
for name in loads:
    anon = host.anon_rise(name)
    if anon is not None:
        print(f"- {name}: of its {fmt_bytes(host.rise(name))} rise, at least {fmt_bytes(anon)} was the process's own "
              f"(anonymous) memory (sampled), at most the rest pages mapped from files (the checkpoint, code).")
kept = host.difference(half_path, fp16_path, of="held")
print(f"- When the load returned: {kept.line()}")
print(f"- (a) still held {fmt_bytes(host.held(half_path))} of its {fmt_bytes(host.rise(half_path))} peak when it "
      f"returned ({host.held(half_path) / host.rise(half_path):.0%})"
      + (": the memory the cast freed stayed with the process, kept by its allocator for reuse."
         if host.held(half_path) > 0.9 * host.rise(half_path) else
         ": the cast handed most of the FP32 model's memory back to the system." if kept.clear and
         host.held(half_path) < 0.6 * host.rise(half_path) else "."))

# %% [markdown]
# ## Step 6: compare the four side by side
#
# Peak while loading on the device (on a CPU a floor, marked >=), weights kept, peak of one caption under the
# budget, and the drift: exact match against the true captions, then agreement with FP32's captions, top-1
# agreement and largest difference of the prompt logits (the FP32 row is the reference itself). With random
# weights the caption and top-1 columns are noise and are left out.

# %%
rows = [("FP32", fp32_load, fp32_load.peak_or_lower_bound, fp32_run, fp32_quality)]
rows += [(name, r.load, peak, r.run, r.drift.report) for name, r, peak in (
    (".half()", half, half_load_peak), ("FP16 at load", fp16, fp16_load.peak_or_lower_bound),
    ("BF16 at load", bf16, bf16_load.peak_or_lower_bound))]
floor = "" if params.device == "cuda" else ">="
quality_header = "" if random_weights else f" {'exact':>6s} {'=FP32':>6s} {'top-1':>6s}"
print(f"{'':13s} {'load peak':>13s} {'weights':>10s} {'caption peak':>13s}{quality_header} {'max|diff|':>9s}")
for name, load, load_peak, run, q in rows:
    stats = q.logit_stats or {"top1_agreement": 1.0, "max_abs_diff": 0.0}
    agree = 1.0 if q.agreement_with_reference is None else q.agreement_with_reference
    quality = "" if random_weights else f" {q.exact_match:6.0%} {agree:6.0%} {stats['top1_agreement']:6.1%}"
    print(f"{name:13s} {floor + fmt_bytes(load_peak):>13s} {fmt_bytes(load.after_bytes):>10s} "
          f"{fmt_bytes(run.memory.peak_bytes):>13s}{quality} {stats['max_abs_diff']:9.3g}")
if random_weights:
    print("caption and top-1 columns left out: random weights ("
          + ("a build of the original's code" if params.original_code else "full scale, the course's own checkpoint")
          + ")")

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart([fp32_record, half.record, fp16.record, bf16.record], quality_key=None if random_weights else "exact_match",
            budget_bytes=budget.limit_bytes, title=f"FP32 and three ways to 16 bits ({params.scale}, {params.device})")

# %% [markdown]
# Each bar is one caption's peak: the weights at the bottom, then the KV cache and the activations; above it,
# the exact match on the held-out scenes (left out with random weights).
#
# ## What we learned

# %%
fp16_weights = fp16.load.after_bytes
worst_top1 = min(r.drift.report.logit_stats["top1_agreement"] for r in (half, fp16, bf16))
print(f"- 16 bits keep {fmt_bytes(fp16_weights)} of weights against {fmt_bytes(fp32_load.after_bytes)} in FP32 "
      f"(x{fp16_weights / fp32_load.after_bytes:.2f}); a caption peaks at {fmt_bytes(fp16.run.memory.peak_bytes)} "
      f"against {fmt_bytes(fp32_run.memory.peak_bytes)} (x{fp16.run.memory.peak_bytes / fp32_run.memory.peak_bytes:.2f}).")
print(f"- On the device, `.half()` after an FP32 load needs {'' if params.device == 'cuda' else 'at least '}"
      f"{fmt_bytes(half_load_peak)} while loading, x{half_load_peak / fp16_weights:.2f} what `dtype=torch.float16` "
      f"at load keeps ({'' if params.device == 'cuda' else 'at least '}"
      f"{fmt_bytes(fp16_load.peak_or_lower_bound)} on its way).")
if random_weights:
    print("- Drift from FP32, logits only (random weights: captions and top-1 are noise): mean |diff| "
          + ", ".join(f"{name} {r.drift.report.logit_stats['mean_abs_diff']:.2g}"
                      for name, r in ((".half()", half), ("FP16", fp16), ("BF16", bf16))) + ".")
else:
    print(f"- Against FP32: .half() and FP16 at load agree on {half.drift.report.agreement_with_reference:.0%} and "
          f"{fp16.drift.report.agreement_with_reference:.0%} of {n_eval} captions, BF16 on "
          f"{bf16.drift.report.agreement_with_reference:.0%}; the top-scoring token of the prompt logits matches at "
          f"{worst_top1:.1%} of positions or more.")

# %% [markdown]
# The lines that depend on this machine (host RAM and speed) come last:

# %% tags=["nbval-ignore-output"]
first, mapped = host.difference(half_path, fp16_path), host.difference(map_path, fp16_path)
own = host.difference(half_path, fp16_path, of="anon") if anon_known else first
verdict = ("no verdict: not clear of this run's noise" if not own.clear else
           f"(a) needed x{own.first_bytes / own.second_bytes:.2f} (b)'s {'own memory' if anon_known else 'RSS'}: ask "
           f"for the dtype in from_pretrained" if own.bytes > 0 else "(a) needed less than (b) here")


def both(name):
    anon = host.anon_rise(name)
    return fmt_bytes(host.rise(name)) + ("" if anon is None else f" ({fmt_bytes(anon)} of it its own memory)")


print(f"- Host RAM ({host.method}, a fresh process per load): (a) FP32 then .half() rose {both(half_path)}, "
      f"(b) float16 at load {both(fp16_path)}: {verdict}. (c) device_map to {params.device} rose {both(map_path)} "
      f"and held {fmt_bytes(host.held(map_path))} at its end"
      + ("; no clear difference from (b)." if not mapped.clear else "."))
cpu = torch.backends.cpu.get_cpu_capability()
where = torch.cuda.get_device_name(0) if params.device == "cuda" else f"CPU ({cpu})"
print(f"- Speed on {where}, prefill | generation: " + ", ".join(
    f"{name} {s.prefill_tokens_per_s:.0f} | {s.tokens_per_s:.1f} tokens/s" for name, s in speeds.items()) + ".")
emulated = [name for name, s in speeds.items() if s.emulated_products]
for phase, speed in (("prefill", lambda s: s.prefill_tokens_per_s), ("generation", lambda s: s.tokens_per_s)):
    ratios = [speed(s) / speed(speeds["FP32"]) for name, s in speeds.items() if name != "FP32"]
    verdict = ("no verdict on this CPU's 16-bit speed: " + ", ".join(emulated) + " computed their products in FP32"
               if emulated else "faster" if min(ratios) > 1 else "slower" if max(ratios) < 1 else
               "neither faster nor slower throughout")
    print(f"- 16-bit {phase} runs at x{min(ratios):.2f} to x{max(ratios):.2f} FP32's speed here: {verdict}.")

# %% [markdown]
# **Questions.** (1) On a 24 GB card, which of the three paths can load the full model at all, and why does the
# order `.half().cuda()` change the answer? (2) BF16 rounds each weight more coarsely than FP16; why is it still
# the usual choice for training? (3) When the logits move, which positions of a caption would you expect to flip
# first? (4) If a load in the checkpoint's own dtype keeps its weights as the checkpoint's mapped pages, what happens
# to them when the machine runs short of RAM, and what would happen to the FP32 path's copy instead?
