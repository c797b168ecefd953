# %% [markdown]
# # 06 · INT8 and NF4 shrink the linear layers about 2x and 4x; the output head, embeddings and norms stay 16-bit
#
# Loading through `BitsAndBytesConfig` replaces the model's `nn.Linear` layers with bitsandbytes layers that
# store 8-bit (LLM.int8()) or 4-bit (NF4) weights. Here we measure what that saves and what it costs: the
# footprint, a caption's peak, the speed, the drift from FP32; we list what stays unquantized and why, and check
# whether PLoRA still acts only at the image tokens.

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
from xcomp_lab.course.notebook import batch_of_images, start

params = start(scale=scale, device=device, budget_gb=budget_gb, model_name_or_path=model_name_or_path,
               batch_size=batch_size, image_size=image_size, max_new_tokens=max_new_tokens,
               attn_implementation=attn_implementation, seed=seed, results_path=results_path)
print(params)

# %% [markdown]
# ## With the original's own code: the usual advice fails, then two recipes that work
#
# This section runs where `model_name_or_path` is a checkpoint of the original model's own remote code
# (transformers 4.33.2); with the replica it says so and the steps below it follow. Those steps read the replica's
# own layers, so with the original's checkpoint each of their cells is skipped (`if not params.original_code`). The usual advice for 8 bits is
# one argument, `quantization_config=BitsAndBytesConfig(load_in_8bit=True)`. Here it is, as a user writes it, then
# the caption exactly as the quick start asks for it:

# %%
import tempfile

import torch
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons.quantization import failure_line, projection_classes

if params.original_code:
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    folder = tempfile.TemporaryDirectory(prefix="xcomp-lab-06-")
    image_file = f"{folder.name}/image.png"
    batch_of_images(params)[0].save(image_file)  # the original's chat() reads an image file
    model = AutoModel.from_pretrained(params.model_name_or_path, trust_remote_code=True, torch_dtype=torch.float16,
                                      quantization_config=BitsAndBytesConfig(load_in_8bit=True),  # the advice
                                      device_map={"": params.device})
    tokenizer = AutoTokenizer.from_pretrained(params.model_name_or_path, trust_remote_code=True)
    advice_projections, advice_error = projection_classes(model), None
    print(advice_projections)
    try:
        answer, _ = model.chat(tokenizer, "<ImageHere>Please describe this image in detail.", image=image_file,
                               history=[], do_sample=False, max_new_tokens=params.max_new_tokens)
        print(f"model.chat answered: {answer!r}")
    except TypeError as error:
        advice_error = failure_line(error)
        print(advice_error)
    del model, tokenizer
else:
    print("the replica: its PLoRA keeps the base projection as a plain nn.Linear (base_layer), so "
          "BitsAndBytesConfig works as it is (Steps 3 to 9)")

# %% [markdown]
# Why, where it failed: the original writes each PLoRA projection (`wqkv`, `wo`, `w1`, `w2`, `w3`) as a subclass
# of `nn.Linear` that adds a low-rank branch at the image tokens and is called with two arguments,
# `self.wqkv(hidden_states, im_mask)`. transformers' bitsandbytes integration replaces every `nn.Linear`,
# subclasses included, by a plain `Linear8bitLt` (`Linear4bit` for `load_in_4bit`): the first line above counts
# what the load left (the branch's `Plora_A`/`Plora_B` weights are dropped), and the quantized layer's
# `forward(x)` takes one argument, so the first projection raises the `TypeError` printed above.
#
# Two recipes work with the unchanged code (`xcomp_lab.original.quantize`): `quantize_plora(model, "int8" | "nf4")`
# after an FP16 load quantizes each PLoRA's base weight and keeps its branch in FP16; `skip_plora_config(...)`
# keeps transformers' own load and lists the PLoRA projections in `llm_int8_skip_modules`. Both run under autocast,
# as the original's FP16 weights need (its `chat()` makes the image in FP32). Each is loaded and captioned below by
# the course's own `load_for_step` and `run_step`, against the FP16 model:

# %%
from xcomp_lab.lessons.quantization import recipe_table, run_original_recipes

if params.original_code:
    recipes = {r.name: r for r in run_original_recipes(params, batch_of_images(params),
                                                       ("fp16", "int8-plora", "int8-skip", "nf4-plora", "nf4-skip"))}
    print(recipe_table(list(recipes.values())))
    smallest = min(recipes.values(), key=lambda r: r.weights_bytes)
    print(f"smallest weights: {smallest.name}, x{smallest.weights_bytes / recipes['fp16'].weights_bytes:.2f} FP16's; "
          f"skipping the PLoRA layers keeps x{recipes['int8-skip'].weights_bytes / recipes['fp16'].weights_bytes:.2f} "
          f"(INT8) and x{recipes['nf4-skip'].weights_bytes / recipes['fp16'].weights_bytes:.2f} (NF4): the decoder stays FP16")
    print(f"\nint8-plora's modules by class:\n{recipes['int8-plora'].module_table()}")
    print("\nPLoRA on (im_mask) against off, on the original's own prompt:")
    for r in recipes.values():
        print(f"{r.name}: {r.plora}\n  verdict: {r.plora.verdict()}")
    folder.cleanup()
else:
    print("the replica's INT8 and NF4 follow (Steps 1 to 10)")

# %% [markdown]
# The table's last column says which class each decoder projection became: `QuantizedPLoRA` (the base weight in
# bitsandbytes, the branch kept) for `quantize_plora`, the original `PLoRA` left in FP16 for the skip list. The
# last lines run each model's prefill on the original's own prompt twice, with `im_mask` and without it (PLoRA off):
# the text before the image sees only text in both runs, so where PLoRA acts only at image tokens its logits do not
# change there, and from the first image token on they do. For LLM.int8() the check is repeated without its
# outlier decomposition, which picks columns over all positions at once (Step 6 below explains it for the replica). The
# module table lists, for `quantize_plora`'s INT8 model, which classes hold bitsandbytes weights and which kept 16
# bits (its vision tower, projector, embeddings, norms and output head: the recipe quantizes the PLoRA bases only). The
# ratios are this checkpoint's: the original's small build has one decoder layer of the real width beside the
# full-size CLIP tower and projector, the released model 32; the full-size run on an H200 (`results/original-h200/`)
# measured `quantize_plora` at full size.
#
# **Prediction.** By *params x bytes per param*, INT8 stores 1 byte per weight and NF4 half a byte, plus
# statistics to scale them back: LLM.int8() keeps one FP32 scale per output row; NF4 one absmax per block of 64
# weights, itself quantized to 8 bits with one FP32 absmax per 256 blocks ("double quantization"), plus the two
# small lookup tables of the codes (16 and 256 FP32 values) that every 4-bit layer holds a copy of. But only
# `nn.Linear` layers are converted, so everything else keeps its 16 bits: the model shrinks less than its
# linears.
#
# ## Step 1: the FP32 reference
#
# Quality is judged against the FP32 model, as in notebook 02: its greedy captions of a held-out subset of
# scenes, and the prefill logits (scores of every vocabulary entry at every prompt position) of the first few
# prompts. `take_reference` loads it, takes both and frees it before anything else loads.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    import gc

    import torch
    from xcomp_lab.core.units import fmt_bytes
    from xcomp_lab.lessons.quantization import take_reference

    cuda = params.device == "cuda"
    images = batch_of_images(params)
    baseline = take_reference(params, n=4, n_logits=2)  # few scenes: 16-bit products are slow on a CPU
    print(baseline)

# %% [markdown]
# The exact match is the FP32 model's own score against the true captions; the quantized models are scored the
# same way, and by their agreement with these FP32 captions. At `scale="full"` the course's replica has random
# weights (the real ones cannot be shipped), and the line above then says its captions are noise: so is every
# quality figure of this notebook at that scale. Memory and speed are measured all the same, though not quite as
# real weights would give them: where a caption ends and LLM.int8()'s outlier columns (Step 6) depend on the
# values.

# %% [markdown]
# **Exercise 6.1: predict, then measure.** INT8 stores 1 byte per weight where FP16 stores 2. Predict the INT8
# model's weights (statistics included) as a multiple of the FP16 model's: a plain number, 0.5 for half. Write
# it into `my_int8_weights_x` before Step 2 prints the course's own prediction; the cell after the INT8 load
# (Step 3) compares it with this run, and `answer_6_1.solution()` shows the worked reasoning.

# %%
my_int8_weights_x = None  # your prediction: INT8 weights / FP16 weights

# %% [markdown]
# ## Step 2: measure the FP16 baseline, in plain PyTorch first
#
# bitsandbytes quantizes from the 16-bit weights and computes in 16 bits, so FP16 is the baseline to beat. First
# the measurement itself, without the course's helpers. On a GPU the caching allocator counts what it gives out:
# after the load, `torch.cuda.memory_allocated()` is the weights (plus cuBLAS's workspace once a matrix product has
# run); `torch.cuda.reset_peak_memory_stats()` before a call and `torch.cuda.max_memory_allocated()` after it give
# the call's peak. A CPU has no such counters: there
# the course's tensor accounting (`xcomp_lab.memory.measure`) counts every tensor an operation returns and stands
# in for the allocator. The line says which one ran.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.lessons.quantization import load_step
    from xcomp_lab.memory import measure

    model, tokenizer, fp16_footprint = load_step("fp16", params)
    query = "<ImageHere>Describe the image in one sentence."
    if cuda:
        before = torch.cuda.memory_allocated()  # all the allocator holds: the weights (and cuBLAS's workspace, if any)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            answer, _ = model.chat(tokenizer, query, image=images[0], max_new_tokens=params.max_new_tokens, do_sample=False)
        peak = torch.cuda.max_memory_allocated()
        tool = "torch.cuda.memory_allocated() before, max_memory_allocated() during"
    else:
        before = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))  # the weights
        with measure("cpu", model=model) as m, torch.no_grad():
            answer, _ = model.chat(tokenizer, query, image=images[0], max_new_tokens=params.max_new_tokens, do_sample=False)
        peak = m.result.peak_bytes
        tool = "CPU tensor accounting (xcomp_lab.memory.measure), from the weights"
    print(f"{tool}: {fmt_bytes(before)} -> model.chat peaks at {fmt_bytes(peak)}, {fmt_bytes(peak - before)} above | "
          f"{answer!r}")

# %% [markdown]
# Every step below goes through `caption_step`, which does the same around the course's own captioning call
# (greedy, the step's gradient mode and autocast setting, the budget in force), scores the model against FP32,
# appends the results record, and times the model outside the measurement. From the FP16 model we also predict
# the quantized footprints: each `nn.Linear` but the output head at 1 byte (INT8) or half a byte (NF4) per weight
# plus its statistics, every other tensor unchanged.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.lessons.quantization import caption_step, plora_check

    fp16 = caption_step("fp16", model, tokenizer, images, params, baseline, fp16_footprint)
    print(fp16)
    print(f"caption_step's peak {fmt_bytes(fp16.peak_bytes)} = x{fp16.peak_bytes / peak:.3f} model.chat's above")
    predicted = fp16_footprint.predicted
    print(f"FP16 weights {fmt_bytes(fp16_footprint.total_bytes)} | predicted INT8 {fmt_bytes(predicted['int8'])}, "
          f"NF4 {fmt_bytes(predicted['nf4'])}")
    fp16_plora = plora_check(model, tokenizer, images, params)  # Step 6's check on the unquantized model, for comparison

# %% [markdown]
# The first line scores FP16 against FP32: it differs from FP32 only by rounding, and the quantized models will
# be compared with this line. The second compares the helper's peak with `model.chat`'s: the same prompt, greedy
# in both, through two generation loops. The speed, timed outside any memory measurement (whose CPU accounting
# slows every operation) for the same number of tokens in every model:

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    print(f"FP16: {fp16.speed}")

# %% [markdown]
# Before the next load, the model goes and its memory with it, in plain PyTorch: drop the last reference,
# collect, and on a GPU hand the cached blocks back (`torch.cuda.empty_cache()`), so that the next measurement
# starts from nothing.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    del model, tokenizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

# %% [markdown]
# ## Step 3: load in 8 bits (LLM.int8())
#
# One argument changes: a `BitsAndBytesConfig(load_in_8bit=True)`. transformers swaps each `nn.Linear` for a
# bitsandbytes `Linear8bitLt` before the weights arrive, and each weight is quantized as it loads: per output
# row, scaled so its largest value maps to 127.
#
# ```python
# model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float16,
#                                   quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # changed line
# ```
#
# The plain count first: parameters and buffers, and transformers' own `model.get_memory_footprint()`; then the
# course's breakdown, which adds what bitsandbytes keeps beside the weights.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    model, tokenizer, int8_footprint = load_step("int8", params)
    summed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(f"parameters + buffers {fmt_bytes(summed)} | model.get_memory_footprint() {fmt_bytes(model.get_memory_footprint())}"
          f" | bitsandbytes' scales beside them {fmt_bytes(int8_footprint.statistics_bytes)}")
    if cuda:
        print(f"torch.cuda.memory_allocated() {fmt_bytes(torch.cuda.memory_allocated())}: the allocator counts the scales too")
    print(int8_footprint.table())
    int8_weights, fp16_weights = int8_footprint.total_bytes, fp16_footprint.total_bytes
    print(f"predicted {fmt_bytes(predicted['int8'])} | measured {fmt_bytes(int8_weights)} | "
          f"x{int8_weights / predicted['int8']:.3f} | difference {int8_weights - predicted['int8']:,} bytes")
    decoder = "decoder (without PLoRA)"
    print(f"x{int8_weights / fp16_weights:.2f} FP16's weights, x{int8_weights / baseline.fp32_weights_bytes:.2f} FP32's | "
          f"decoder linears x{int8_footprint.part_bytes(decoder) / fp16_footprint.part_bytes(decoder):.3f} their FP16 size")

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.course.exercises import check

    answer_6_1 = check("6.1", my_int8_weights_x, measured=int8_weights / fp16_weights, fp16_bytes=fp16_weights,
                       predicted_bytes=predicted["int8"], stats_bytes=int8_footprint.statistics_bytes)

# %% [markdown]
# The breakdown counts each part as stored: INT8 values plus the per-row FP32 scales (`SCB`), which bitsandbytes
# keeps beside the weight (on the parameter or on the layer's `state`), not as parameters of their own. Summing
# `model.parameters()` and `model.buffers()`, which is what `get_memory_footprint()` does, misses them. The
# prediction line compares the prediction with the measurement byte for byte; the last line says how far from
# halving FP16 the model lands, and how far its decoder's linears do, with their scales.
#
# ## Step 4: caption in INT8
#
# The same measured caption as every step (no autocast: bitsandbytes computes in FP16 itself), and the drift
# from FP32:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    int8 = caption_step("int8", model, tokenizer, images, params, baseline, int8_footprint)
    print(int8)
    peak_fell = fp16.peak_bytes - int8.peak_bytes
    weights_fell = fp16.run.memory.weights_bytes - int8.run.memory.weights_bytes
    gap = weights_fell - peak_fell
    print(f"caption peak {fmt_bytes(int8.peak_bytes)} | x{int8.peak_bytes / fp16.peak_bytes:.2f} FP16's peak "
          f"({fmt_bytes(fp16.peak_bytes)}), against x{int8.run.memory.weights_bytes / fp16.run.memory.weights_bytes:.2f} "
          f"for the measured weights | the peak fell by {fmt_bytes(peak_fell)}, the weights by {fmt_bytes(weights_fell)}: "
          + ("the same within 1%" if abs(gap) <= 0.01 * weights_fell else
             f"{fmt_bytes(abs(gap))} {'less' if gap > 0 else 'more'} than the weights (the activations and cache differ)"))

# %% [markdown]
# The activations and the KV cache stay 16-bit, so the peak shrinks by a smaller factor than the weights: the
# line gives both factors, and how the fall of the peak compares with the fall of the weights. (The measurement's
# weights are the model's parameters and buffers; on a CPU the scales are not among them and not counted, on a
# GPU the allocator counts them as memory in use before the call.) The drift line compares with FP16's in Step 2:
# what quantization adds to rounding.

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    print(f"INT8: {int8.speed} | x{int8.speed.tokens_per_s / fp16.speed.tokens_per_s:.2f} FP16's speed")

# %% [markdown]
# ## Step 5: what stayed 16-bit, and why
#
# bitsandbytes only converts `nn.Linear`. Listing the modules that hold tensors by class shows the rest; the
# count of converted layers is plain code over `model.named_modules()`:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    import bitsandbytes as bnb

    print(int8_footprint.module_table())
    where = {"decoder": "model.", "vision tower": "vit.", "projector": "vision_proj."}
    print("quantized linears: " + ", ".join(
        f"{sum(isinstance(m, bnb.nn.Linear8bitLt) and n.startswith(prefix) for n, m in model.named_modules())} in the {part}"
        for part, prefix in where.items()))
    hf_quantizer = getattr(model, "hf_quantizer", None)
    print("transformers' skip list:", sorted(getattr(hf_quantizer, "modules_to_not_convert", None) or []))

# %% [markdown]
# - **`output` (the head, a plain `Linear`)**: transformers keeps the model's output embeddings out of
#   quantization by default (its `get_keys_to_not_convert` adds `get_output_embeddings()`, tied weights and the
#   last parameter to the skip list), "for numerical stability" in its own words: the logits pick every token.
#   The other entry, the name of the last parameter registered, is meant to catch an `lm_head`; here it is the
#   projector's bias, which names no module, so the projector's last linear is quantized anyway.
# - **Embeddings** (the token table and the ViT's position table): `nn.Embedding` is a lookup, not a matrix
#   product; bitsandbytes' layers replace `nn.Linear` only.
# - **Norms** (RMSNorm, LayerNorm) and the ViT's patch **`Conv2d`**: not linears.
# - **Rotary tables**: buffers, not weights.
#
# The table's `quantized` column and the count above show where the converted linears are: decoder, vision tower
# and projector.
#
# ## Step 6: does PLoRA still act only at the image tokens?
#
# A PLoRA projection adds a low-rank update `B(A(x))` only where `im_mask` marks image tokens. The original code
# writes it as a subclass of `nn.Linear`: bitsandbytes would replace the whole module with a plain 8-bit linear
# and silently drop the branch. The replica keeps the base projection as a separate plain `nn.Linear` named
# `base_layer`, so bitsandbytes converts it and leaves the PLoRA module, and its branch, in place. `Plora_A` and
# `Plora_B` are linears too, so they are quantized as well:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    print(model.model.layers[0].attention.wqkv)

# %% [markdown]
# The check runs the caption prompt twice, with `im_mask` and without it (PLoRA off). Attention is causal, so in
# a model that computes each position on its own the text before the image sees only text in both runs: its
# logits cannot change, and from the first image token on they must. LLM.int8() does not compute each position on
# its own. It multiplies the activations in int8 row by row, except the input columns that hold an outlier (a
# value of at least its threshold, 6.0 by default) in **any** row it multiplies at once: those columns go through
# a 16-bit product, for every row. The image tokens' rows therefore decide how the text rows before them are
# quantized. To tell "PLoRA acts" apart from "the outlier decomposition mixes positions", the INT8 check is run
# again without the decomposition (threshold 0, as `BitsAndBytesConfig(load_in_8bit=True,
# llm_int8_threshold=0.0)` loads it), and the prefill's outlier columns are counted: those picked over all rows
# against those the text rows before the image hold alone. The unquantized FP16 model of Step 2 is the reference.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    int8_plora = plora_check(model, tokenizer, images, params)
    print(fp16_plora)
    print(int8_plora)
    print(f"verdict: {int8_plora.verdict()}")

# %% [markdown]
# The verdict is computed from the lines above it. The same mechanism has a consequence the check does not run:
# with LLM.int8()'s outlier decomposition, one prompt's output depends on whatever else is multiplied with it, so
# a caption in a batch can change with the other images of the batch. NF4 quantizes only the weights and
# multiplies 16-bit activations: a row's result does not depend on what the other rows hold (Step 9 repeats the
# check there).
#
# ## Step 7: what a quantized matrix product costs here
#
# A quantized layer stores small integers, but matrix products run in floating point or on integer units, and
# how bitsandbytes 0.50 gets there depends on the device. LLM.int8() always quantizes the activations to int8
# row by row (outlier columns apart); on a CUDA GPU it then multiplies int8 by int8 on the tensor cores; on a
# CPU it uses `torch._int_mm` where the CPU has AVX-512 and FP32 elsewhere (`A.float() @ B.float().t()`, a 4-byte
# copy of the weight per call). The two give the same integers while a row's sum stays below 2^24, where FP32
# counts exactly; on a CPU the next cell checks that bound for the widest quantized layer. NF4 on a CUDA GPU runs
# bitsandbytes' own kernel on the packed weight for a few rows (a decode step) and, by shape and GPU, either that
# kernel or a dequantized FP16 copy for many; on a CPU's portable path (Step 8) it dequantizes the whole weight
# to FP16 for every call. The measured line says what one call on the whole prompt made besides its output:
# on a CPU the tensor accounting sees an operation's outputs only, not the scratch a bitsandbytes kernel makes
# inside; on a GPU the allocator sees every block.
#
# Timed on the decoder's largest quantized linear, for one token (a decode step) and for the whole prompt (the
# prefill), against dequantizing its weight alone and a 16-bit product with the dequantized weight:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.lessons.quantization import quantized_kernels

    int8_kernels = quantized_kernels(model, fp16.run.prompt_tokens, device=params.device)
    print(int8_kernels.facts())

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    print(int8_kernels.timings())
    decode = int8_kernels.costs[0]
    print(f"INT8, one decode step: the quantized product takes x{decode.vs_fp16:.2f} the 16-bit product of the same "
          f"layer here: {'slower' if decode.vs_fp16 > 1 else 'faster'}")

# %% [markdown]
# Read the factors against the 16-bit product of the same shape: above 1 the quantized layer is slower. For a
# single token the product itself is tiny, so whatever the kernel does to the weight first can dominate; for
# the whole prompt the product's own cost grows with the tokens while turning the weight back into floats does
# not. The usual advice says smaller weights run faster where reading the weights is the bottleneck (a decode
# step) and a kernel reads them packed; the last line, and NF4's in Step 9, say whether that held in this run, on
# a device that a shared machine can make noisy.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    del model, tokenizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

# %% [markdown]
# ## Step 8: load in 4 bits (NF4, double quantization)
#
# `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
# bnb_4bit_compute_dtype=torch.float16)`: NF4's 16 levels are spaced as the quantiles of a normal distribution,
# which fits trained weights better than evenly spaced levels. Two 4-bit values share a byte, so the stored
# weight is a flat `uint8` tensor; its shape lives in `quant_state`.

# %%
figure = None
if not params.original_code:  # the replica's step; the original's code is shown above
    model, tokenizer, nf4_footprint = load_step("nf4", params)  # changed: the 4-bit config
    print(nf4_footprint.table())
    nf4_weights = nf4_footprint.total_bytes
    print(f"predicted {fmt_bytes(predicted['nf4'])} | measured {fmt_bytes(nf4_weights)} | "
          f"x{nf4_weights / predicted['nf4']:.3f} | difference {nf4_weights - predicted['nf4']:,} bytes")
    print(f"x{nf4_weights / fp16_weights:.2f} FP16's weights, x{nf4_weights / baseline.fp32_weights_bytes:.2f} FP32's")
    kept = sum(nf4_footprint.part_bytes(part) for part in ("embeddings", "output head", "rotary tables"))
    print(f"decoder linears: x{nf4_footprint.part_bytes(decoder) / fp16_footprint.part_bytes(decoder):.3f} their FP16 "
          f"size | embeddings, output head and rotary tables: {fmt_bytes(kept)} = {kept / fp16_weights:.0%} of FP16's "
          f"weights, {kept / nf4_weights:.0%} of NF4's")
    figure = nf4_footprint.chart(title=f"{params.scale} replica in NF4: where the bytes are")
figure

# %% [markdown]
# The decoder's linears shrink to the fraction the line gives, statistics included, while the parts that stayed
# 16-bit keep their bytes: their share of the total grows, as the line and the chart show.
#
# **Which 4-bit kernel runs on a CPU.** bitsandbytes has two ways to multiply by a 4-bit weight on a CPU and
# picks one by the processor. The portable one dequantizes the weight to FP16 for every call (any CPU). On CPUs
# with AVX512-BF16 (current Xeons, AMD Zen 4 and later) the first call instead repacks each weight into tiles of
# 32 output rows with one BF16 scale per block, and later calls multiply in BF16 with a fused kernel. That
# repacking only accepts layers with a multiple of 32 outputs and whole 64-value blocks per input row; a layer
# of another shape crashes (`AssertionError: N must be divisible by block_n`). The two kernels also round
# differently, so the course pins the portable one: every laptop in a room prints the same figures. Set
# `XCOMP_LAB_BNB_CPU_PATH=packed` (or `auto`, bitsandbytes' own choice) before starting Jupyter to see the other;
# layers whose shape the packed format rejects then stay on the portable kernel, still quantized.
#
# ## Step 9: caption in NF4

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    nf4 = caption_step("nf4", model, tokenizer, images, params, baseline, nf4_footprint)
    print(nf4)
    print(f"caption peak {fmt_bytes(nf4.peak_bytes)} | x{nf4.peak_bytes / fp16.peak_bytes:.2f} FP16's peak")
    nf4_plora = plora_check(model, tokenizer, images, params)
    print(nf4_plora)
    print(f"verdict: {nf4_plora.verdict()}")
    nf4_kernels = quantized_kernels(model, fp16.run.prompt_tokens, device=params.device)
    print(nf4_kernels.facts())

# %% [markdown]
# Sixteen levels per weight instead of 256: the drift line against FP32 says what that did to the captions and
# logits here. The PLoRA lines repeat Step 6's check on the 4-bit model, which has no outlier decomposition; the
# kernel lines give Step 7's call on the NF4 layer, and on a CPU which 4-bit path runs.

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    print(f"NF4: {nf4.speed} | x{nf4.speed.tokens_per_s / fp16.speed.tokens_per_s:.2f} FP16's speed")
    print(nf4_kernels.timings())
    nf4_vs_fp16 = nf4.speed.tokens_per_s / fp16.speed.tokens_per_s
    print(f"NF4 generates x{nf4_vs_fp16:.2f} FP16's tokens per second on {nf4_kernels.machine}: the advice that 4-bit "
          f"weights decode faster {'holds' if nf4_vs_fp16 > 1 else 'does not hold'} in this run")

# %% [markdown]
# ## Step 10: the three side by side

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    del model, tokenizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    noise = " (random weights: quality columns are noise)" if baseline.random_weights else ""
    print(f"{'':5s} {'weights':>11s} {'vs FP16':>7s} {'caption peak':>13s} {'exact':>6s} {'=FP32':>6s} {'top-1':>6s} "
          f"{'max|diff|':>9s}{noise}")
    for name, step in (("FP16", fp16), ("INT8", int8), ("NF4", nf4)):
        stats = step.drift.logit_stats
        print(f"{name:5s} {fmt_bytes(step.weights_bytes):>11s} {step.weights_bytes / fp16_weights:7.2f} "
              f"{fmt_bytes(step.peak_bytes):>13s} {step.drift.exact_match:6.0%} {step.drift.agreement_with_reference:6.0%} "
              f"{stats['top1_agreement']:6.1%} {stats['max_abs_diff']:9.3g}")

# %%
figure = None
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.course.charts import steps_chart

    figure = steps_chart([fp16.record, int8.record, nf4.record], budget_bytes=baseline.budget.limit_bytes,
                         quality_key=None if params.random_weights else "exact_match",
                         title=f"FP16, INT8 and NF4 under a {params.budget_gb:g} GB budget ({params.scale}, "
                               f"{params.device})")
figure

# %% [markdown]
# Each bar is one caption's peak: weights at the bottom, then the KV cache and the activations, which stay
# 16-bit in all three; above each bar, the exact match on the held-out scenes (left out where the weights are
# random).
#
# ## What we learned

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    print(f"- Weights: FP16 {fmt_bytes(fp16_weights)}, INT8 {fmt_bytes(int8_weights)} (x{int8_weights / fp16_weights:.2f}), "
          f"NF4 {fmt_bytes(nf4_weights)} (x{nf4_weights / fp16_weights:.2f}), statistics included; the prediction "
          f"(linears but the output head quantized, the rest 16-bit) is off by at most "
          f"{max(abs(int8_weights / predicted['int8'] - 1), abs(nf4_weights / predicted['nf4'] - 1)):.1%}.")
    print(f"- A caption peaks at {fmt_bytes(int8.peak_bytes)} in INT8 and {fmt_bytes(nf4.peak_bytes)} in NF4 against "
          f"{fmt_bytes(fp16.peak_bytes)} in FP16 (x{int8.peak_bytes / fp16.peak_bytes:.2f} and "
          f"x{nf4.peak_bytes / fp16.peak_bytes:.2f}): activations and KV cache stay 16-bit.")
    print(f"- Against FP32 captions: FP16 agrees on {fp16.drift.agreement_with_reference:.0%}, INT8 on "
          f"{int8.drift.agreement_with_reference:.0%}, NF4 on {nf4.drift.agreement_with_reference:.0%} of "
          f"{fp16.drift.n}; top-1 logit agreement {fp16.drift.logit_stats['top1_agreement']:.1%} / "
          f"{int8.drift.logit_stats['top1_agreement']:.1%} / {nf4.drift.logit_stats['top1_agreement']:.1%}"
          + (" (random weights: noise)." if baseline.random_weights else "."))
    acts = [name for name, check_ in (("INT8", int8_plora), ("NF4", nf4_plora)) if check_.plora_acts]
    print(f"- PLoRA still acts only from the first image token on in {' and '.join(acts) or 'neither model'}"
          + ("; in INT8 the text before the image changes too, because LLM.int8() picks its outlier columns over all "
             "positions at once (without the decomposition it does not)." if int8_plora.outliers_mix_positions else "."))
else:
    print(f"- The usual advice, load_in_8bit, left {advice_projections.removeprefix('decoder projections: ')}; "
          + (f"the first chat raised {advice_error.split(':')[0]}." if advice_error else "the chat ran."))
    fp16_bytes = recipes["fp16"].weights_bytes
    print("- Weights against FP16's, statistics included: " + ", ".join(
        f"{r.name} x{r.weights_bytes / fp16_bytes:.2f}" for r in recipes.values() if r.name != "fp16") + ".")
    acting = [r.name for r in recipes.values() if r.plora.plora_acts]
    print(f"- PLoRA acts from the first image token on, and only there once positions are apart, in {len(acting)} "
          f"of the {len(recipes)} models ({', '.join(acting) or 'none'}).")
    print("- Caption peaks: " + ", ".join(f"{r.name} {fmt_bytes(r.run.memory.peak_bytes)} "
                                        f"({'OOM' if r.run.memory.oom else 'fits'})" for r in recipes.values())
          + f" under {fmt_bytes(recipes['fp16'].run.memory.budget_bytes)}.")

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    print(f"- Speed on {nf4_kernels.machine}: " + ", ".join(f"{s.name.upper()} {s.speed.tokens_per_s:.1f} tokens/s"
                                                           for s in (fp16, int8, nf4))
          + f"; one decode-step product costs x{int8_kernels.costs[0].vs_fp16:.1f} (INT8) and "
          f"x{nf4_kernels.costs[0].vs_fp16:.1f} (NF4) the 16-bit product of the same layer.")

# %% [markdown]
# **Questions.** (1) Why does NF4 not reach a quarter of FP16's weights, and which part would you have to
# quantize to get closer? (2) The output head is left in 16 bits by default: what would you expect to happen to
# the logits if it were quantized too? (3) LLM.int8() couples the rows it multiplies at once: would two captions
# of the same image, one alone and one in a batch of four different images, be sure to agree in INT8? in NF4?
# (4) On a GPU with room for the FP16 model, when is NF4 still worth its drift?
