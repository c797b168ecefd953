# %% [markdown]
# # 06 · INT8 and NF4 shrink the linear layers 2x and 4x; the output head, embeddings and norms stay 16-bit
#
# Loading through `BitsAndBytesConfig` replaces the model's `nn.Linear` layers with bitsandbytes layers that
# store 8-bit (LLM.int8()) or 4-bit (NF4) weights. Here we measure what that saves and what it costs: the
# footprint, a caption's peak, the speed, the drift from FP32; we list what stays unquantized and why, and check
# that PLoRA still acts at the image tokens.

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
# prompts. The FP32 model is freed as soon as the reference is taken: at full scale it would not share the card.

# %%
import torch
from xcomp_lab.lessons.precision import drift_line, fp32_reference, free, measure_load, run_precision_step
from xcomp_lab.data.quality import quality_report
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step
from xcomp_lab.core.units import fmt_bytes

(model, tokenizer), fp32_load = measure_load(lambda: load_for_step(STEPS["fp32-no-autocast"], params), params.device,
                                             label="dtype=torch.float32 at load")
budget = course_budget(params, model.config)
n_eval, n_logits = 4, 2  # held-out scenes captioned by every model (few: 16-bit products are slow on a CPU); prompts whose logits are compared
reference = fp32_reference(model, tokenizer, n=n_eval, n_logits=n_logits, max_new_tokens=params.max_new_tokens,
                           image_size=params.image_size)
fp32_weights = fp32_load.after_bytes
print(f"FP32 weights {fmt_bytes(fp32_weights)} | captions: exact match "
      f"{quality_report(reference.captions, reference.truths).exact_match:.0%} of {n_eval} held-out scenes")
del model
free(params.device)

# %% [markdown]
# The exact match is the FP32 model's own score against the true captions, the score the quantized models are
# compared with; their agreement with these FP32 captions says how much quantization changed.

# %% [markdown]
# **Exercise 6.1: predict, then measure.** INT8 stores 1 byte per weight where FP16 stores 2. Predict the INT8
# model's weights (statistics included) as a multiple of the FP16 model's: a plain number, 0.5 for half. Write
# it into `my_int8_weights_x` before Step 2 prints the course's own prediction; the cell after the INT8 load
# (Step 3) compares it with this run, and `answer_6_1.solution()` shows the worked reasoning.

# %%
my_int8_weights_x = None  # your prediction: INT8 weights / FP16 weights

# %% [markdown]
# ## Step 2: the FP16 baseline, and the prediction
#
# bitsandbytes quantizes from the 16-bit weights and computes in 16 bits, so FP16 is the baseline to beat. From
# the FP16 model we also predict the quantized footprints: each `nn.Linear` but the output head at 1 byte (INT8)
# or half a byte (NF4) per weight plus its statistics, every other tensor unchanged.

# %%
from xcomp_lab.lessons.quantization import predicted_footprint

images = batch_of_images(params)
fp16_step = STEPS["fp16"]
(model, tokenizer), fp16_load = measure_load(lambda: load_for_step(fp16_step, params), params.device,
                                             label="dtype=torch.float16 at load")
predicted = {q: predicted_footprint(model, q) for q in ("int8", "nf4")}
fp16 = run_precision_step(fp16_step, model, tokenizer, images, params, budget, reference, fp16_load)
record(params, fp16.record)
print(drift_line(fp16.drift.report))
fp16_weights = fp16_load.after_bytes
print(f"FP16 weights {fmt_bytes(fp16_weights)} | predicted INT8 {fmt_bytes(predicted['int8'])}, "
      f"NF4 {fmt_bytes(predicted['nf4'])}")

# %% [markdown]
# FP16 drifts from FP32 only by rounding; the quantized models will be compared with this line. Speed is timed
# outside the memory measurement (whose CPU accounting slows every operation), the same number of tokens for
# every model:

# %% tags=["nbval-ignore-output"]
from xcomp_lab.run.speed import generation_speed

speeds = {"FP16": generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                                   image_size=params.image_size, repeats=1)}
print(f"FP16: {speeds['FP16']}")
del model
free(params.device)

# %% [markdown]
# ## Step 3: load in 8 bits (LLM.int8())
#
# One argument changes: a `BitsAndBytesConfig(load_in_8bit=True)` (built by
# `xcomp_lab.model.loading.quantization_config("int8")`). transformers swaps each `nn.Linear` for a
# bitsandbytes `Linear8bitLt` before the weights arrive, and each weight is quantized as it loads: per output
# row, scaled so its largest value maps to 127.
#
# ```python
# model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float16,
#                                   quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # changed line
# ```

# %%
from xcomp_lab.course.charts import format_breakdown, weight_breakdown
from xcomp_lab.model.loading import quantization_config
from xcomp_lab.memory.footprint import statistics_bytes

int8_step = STEPS["int8"]
print(int8_step.describe())
print(quantization_config("int8").to_dict()["load_in_8bit"], "<- load_in_8bit in the config load_for_step passes")
(model, tokenizer), int8_load = measure_load(lambda: load_for_step(int8_step, params), params.device,
                                             label="load_in_8bit=True")
int8_stats = statistics_bytes(model)
int8_weights = int8_load.after_bytes + int8_stats  # parameters and buffers on the device, plus statistics
print(format_breakdown(weight_breakdown(model)))
print(f"stored weights {fmt_bytes(int8_weights - int8_stats)} + statistics {fmt_bytes(int8_stats)} = "
      f"{fmt_bytes(int8_weights)}")
print(f"predicted {fmt_bytes(predicted['int8'])} | measured {fmt_bytes(int8_weights)} | "
      f"x{int8_weights / predicted['int8']:.3f} | difference {int8_weights - predicted['int8']:,} bytes")
print(f"x{int8_weights / fp16_weights:.2f} FP16's weights, x{int8_weights / fp32_weights:.2f} FP32's")

# %%
from xcomp_lab.course.exercises import check

answer_6_1 = check("6.1", my_int8_weights_x, measured=int8_weights / fp16_weights, fp16_bytes=fp16_weights,
                   predicted_bytes=predicted["int8"], stats_bytes=int8_stats)

# %% [markdown]
# The breakdown counts each part as stored: INT8 values plus the per-row FP32 scales (`SCB`), which bitsandbytes
# keeps beside the weight (on the parameter or on the layer's `state`), not as parameters of their own: summing
# `model.parameters()` misses them. The prediction (every linear but the output head at 1 byte, the rest
# unchanged) is checked against the measurement to the byte; the last line says how far from halving FP16 the
# model lands, because some parts did not shrink.
#
# ## Step 4: caption in INT8
#
# The same measured caption as every step (no autocast: bitsandbytes computes in FP16 itself), and the drift
# from FP32:

# %%
int8 = run_precision_step(int8_step, model, tokenizer, images, params, budget, reference, int8_load)
record(params, int8.record)
print(drift_line(int8.drift.report))
print(f"caption peak {fmt_bytes(int8.run.memory.peak_bytes)} | x{int8.run.memory.peak_bytes / fp16.run.memory.peak_bytes:.2f} "
      f"FP16's peak ({fmt_bytes(fp16.run.memory.peak_bytes)}) | the peak fell by "
      f"{fmt_bytes(fp16.run.memory.peak_bytes - int8.run.memory.peak_bytes)}, the measured weights by "
      f"{fmt_bytes(fp16.run.memory.weights_bytes - int8.run.memory.weights_bytes)}")

# %% [markdown]
# The peak falls by what the weights lost, and no more: the activations and the KV cache stay 16-bit, so the
# peak shrinks by a smaller factor than the weights. (The measurement's weights are the model's parameters and
# buffers; on a CPU the scales are not among them and not counted, on a GPU the allocator counts them as memory
# in use before the call.) The drift line compares with FP16's in Step 2: what quantization adds to rounding.

# %% tags=["nbval-ignore-output"]
speeds["INT8"] = generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                                  image_size=params.image_size, repeats=1)
print(f"INT8: {speeds['INT8']} | x{speeds['INT8'].tokens_per_s / speeds['FP16'].tokens_per_s:.2f} FP16's speed")

# %% [markdown]
# ## Step 5: what stayed 16-bit, and why
#
# bitsandbytes only converts `nn.Linear`. Listing the modules that hold tensors by class shows the rest:

# %%
from xcomp_lab.lessons.quantization import format_module_precisions, is_quantized, module_precisions

print(format_module_precisions(module_precisions(model), fmt_bytes))
where = {"decoder": "model.", "vision tower": "vit.", "projector": "vision_proj."}
print("quantized linears: " + ", ".join(
    f"{sum(is_quantized(m) and n.startswith(prefix) for n, m in model.named_modules())} in the {part}"
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
# - **Norms** (RMSNorm, LayerNorm) and the ViT's patch **`Conv2d`**: not linears, and tiny or few.
# - **Rotary tables**: buffers, not weights.
#
# The only quantized class is the linear, in all three parts of the model: decoder, vision tower and projector.
#
# ## Step 6: PLoRA still acts at the image tokens
#
# A PLoRA projection adds a low-rank update `B(A(x))` only where `im_mask` marks image tokens. The original code
# writes it as a subclass of `nn.Linear`: bitsandbytes would replace the whole module with a plain 8-bit linear
# and silently drop the branch. The replica keeps the base projection as a separate plain `nn.Linear` named
# `base_layer`, so bitsandbytes converts it and leaves the PLoRA module, and its branch, in place. `Plora_A` and
# `Plora_B` are linears too, so they are quantized as well:

# %%
from xcomp_lab.run.captioning import prompt_batch
from xcomp_lab.lessons.quantization import plora_effect

print(model.model.layers[0].attention.wqkv)
with torch.inference_mode():
    embeds, im_mask = prompt_batch(model, tokenizer, images[:1], image_size=params.image_size)
int8_plora = plora_effect(model, embeds, im_mask)
print(f"image tokens at positions {int8_plora.first_image_position} to "
      f"{int8_plora.first_image_position + int8_plora.image_tokens - 1} of {int8_plora.positions} | logits with vs "
      f"without im_mask first differ at position {int8_plora.first_difference} | largest difference before it "
      f"{int8_plora.max_diff_before_image:g}, smallest from it on {int8_plora.min_diff_from_image_on:.3g}")

# %% [markdown]
# The same prompt runs twice, with `im_mask` and without it (PLoRA off). Text before the image sees only text, so
# nothing changes there; from the first image token on, every position differs: the quantized branch still
# adds its update, and the text after the image sees it through attention.
#
# ## Step 7: what a quantized matrix product costs here
#
# A quantized layer stores small integers, but matrix products run in floating point. How bitsandbytes 0.50
# gets there depends on the device. LLM.int8() always quantizes the activations to int8 row by row (the few
# columns holding an outlier above 6.0 go through a 16-bit product instead); on a CUDA GPU it then multiplies
# int8 by int8 on the tensor cores, and NF4 uses a fused kernel for single-token steps that reads the 4-bit
# weight directly (longer inputs dequantize first). On a CPU, NF4 on the course's portable path (Step 8) dequantizes
# the whole weight to FP16 for every call and then runs an ordinary product; LLM.int8() multiplies int8 by int8
# with `torch._int_mm` where the CPU has AVX-512 and in FP32 elsewhere (`A.float() @ B.float().t()`, a 4-byte copy
# of the weight per call). The two give the same integers while a row's sum stays below 2^24, where FP32 counts
# exactly; the next cell checks that bound for the widest quantized layer. Those copies live inside the bitsandbytes
# call, where the CPU tensor accounting cannot see them; the measured line below checks it (on a GPU the
# allocator sees any copy a kernel makes).
#
# Timed on the decoder's largest quantized linear, for one token (a decode step) and for the whole prompt (the
# prefill), against dequantizing its weight alone and a 16-bit product with the dequantized weight:

# %%
from xcomp_lab.lessons.quantization import call_memory, dequantized_weight, largest_quantized_linear, matmul_cost

layer_name, layer = largest_quantized_linear(model)
print(f"{layer_name}: {type(layer).__name__}({layer.in_features} -> {layer.out_features}) | stored "
      f"{fmt_bytes(layer.weight.numel() * layer.weight.element_size())} | dequantized to FP16 "
      f"{fmt_bytes(dequantized_weight(layer).numel() * 2)} per call where the kernel dequantizes")
widest = max(m.in_features for m in model.modules() if is_quantized(m))
print(f"widest quantized input: {widest} -> int8 sums up to 127 x 127 x {widest} = {127 * 127 * widest:,}, "
      f"{'below' if 127 * 127 * widest < 2**24 else 'above'} 2^24 = {2**24:,}: FP32 and torch._int_mm "
      f"{'agree exactly' if 127 * 127 * widest < 2**24 else 'may round differently'}")
seen = call_memory(layer, embeds.shape[1], device=params.device)
print(f"one call on {seen.tokens} tokens, measured on {params.device}: peak {fmt_bytes(seen.peak_above_start_bytes)} "
      f"above the start, the output is {fmt_bytes(seen.output_bytes)}: a {fmt_bytes(seen.dequantized_bytes)} "
      f"dequantized copy is {'in' if seen.sees_dequantized_copy else 'NOT in'} the measured peak")

# %% tags=["nbval-ignore-output"]
cpu_note = f"CPU capability {torch.backends.cpu.get_cpu_capability()}" if params.device == "cpu" else torch.cuda.get_device_name(0)
print(f"INT8 on {cpu_note}")
int8_costs = [matmul_cost(layer, tokens, device=params.device) for tokens in (1, embeds.shape[1])]
for cost in int8_costs:
    print(f"{cost} | dequantizing alone takes x{cost.dequantize_s / cost.fp16_matmul_s:.2f} the product")

# %% [markdown]
# Read the factors against the 16-bit product of the same shape: above 1 the quantized layer is slower. For a
# single token the product itself is tiny, so whatever the kernel does to the weight first can dominate; for
# the whole prompt the product's own cost grows with the tokens while turning the weight back into floats does
# not. The usual advice that smaller weights run faster holds where reading the weights is the bottleneck and a
# kernel reads them packed (a GPU decoding with NF4); the factors above say whether it holds here, on a device
# a shared machine makes noisy.

# %%
del model, layer
free(params.device)

# %% [markdown]
# ## Step 8: load in 4 bits (NF4, double quantization)
#
# `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
# bnb_4bit_compute_dtype=torch.float16)`: NF4's 16 levels are spaced as the quantiles of a normal distribution,
# which fits trained weights better than evenly spaced levels. Two 4-bit values share a byte, so the stored
# weight is a flat `uint8` tensor; its shape lives in `quant_state`.

# %%
from xcomp_lab.course.charts import weight_breakdown_chart

nf4_step = STEPS["nf4"]
print(nf4_step.describe())
(model, tokenizer), nf4_load = measure_load(lambda: load_for_step(nf4_step, params), params.device,
                                            label="load_in_4bit=True, nf4")  # changed line: the 4-bit config
nf4_stats = statistics_bytes(model)
nf4_weights = nf4_load.after_bytes + nf4_stats
nf4_rows = weight_breakdown(model)
print(format_breakdown(nf4_rows))
print(f"stored weights {fmt_bytes(nf4_weights - nf4_stats)} + statistics {fmt_bytes(nf4_stats)} = "
      f"{fmt_bytes(nf4_weights)}")
print(f"predicted {fmt_bytes(predicted['nf4'])} | measured {fmt_bytes(nf4_weights)} | "
      f"x{nf4_weights / predicted['nf4']:.3f} | difference {nf4_weights - predicted['nf4']:,} bytes")
print(f"x{nf4_weights / fp16_weights:.2f} FP16's weights, x{nf4_weights / fp32_weights:.2f} FP32's")
sixteen_bit = {"embeddings", "output head", "rotary tables"}
kept = sum(b for part, _, b in nf4_rows if part in sixteen_bit)
decoder_fp16 = dict((part, n) for part, n, _ in nf4_rows)["decoder (without PLoRA)"] * 2
print(f"decoder linears: x{dict((p, b) for p, _, b in nf4_rows)['decoder (without PLoRA)'] / decoder_fp16:.3f} their FP16 "
      f"size | embeddings, output head and rotary tables: {fmt_bytes(kept)} = {kept / fp16_weights:.0%} of FP16's "
      f"weights, {kept / nf4_weights:.0%} of NF4's")
weight_breakdown_chart(nf4_rows, title=f"{params.scale} replica in NF4: where the bytes are")

# %% [markdown]
# **Which 4-bit kernel runs on a CPU.** bitsandbytes has two ways to multiply by a 4-bit weight on a CPU and
# picks one by the processor. The portable one dequantizes the weight to FP16 for every call (any CPU). On CPUs
# with AVX512-BF16 (current Xeons, AMD Zen 4 and later) the first call instead repacks each weight into tiles of
# 32 output rows with one BF16 scale per block, and later calls multiply in BF16 with a fused kernel. That
# repacking only accepts layers with a multiple of 32 outputs and whole 64-value blocks per input row; a layer
# of another shape crashes (`AssertionError: N must be divisible by block_n`). The two kernels also round
# differently, so the course pins the portable one: every laptop in a room prints the same figures. Set
# `XCOMP_LAB_BNB_CPU_PATH=packed` (or `auto`, bitsandbytes' own choice) before starting Jupyter to see the other;
# layers whose shape the packed format rejects then stay on the portable kernel, still quantized.

# %%
from xcomp_lab.model.bnb_cpu import apply_cpu_path, packed_format_accepts

fours = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
rejected = sorted({n.rsplit(".", 1)[-1] for n, m in fours if not packed_format_accepts(m.in_features, m.out_features)})
print(f"{len(fours)} 4-bit linears; the packed CPU format rejects {sum(not packed_format_accepts(m.in_features, m.out_features) for _, m in fours)} "
      f"of them{' (' + ', '.join(rejected) + ': rank ' + str(model.config.plora_rank) + ')' if rejected else ''}")
print(apply_cpu_path(model) if params.device == "cpu" else "on a GPU bitsandbytes runs its CUDA kernels: no CPU path")

# %% tags=["nbval-ignore-output"]
from xcomp_lab.model.bnb_cpu import cpu_has_avx512bf16

print(f"this CPU {'has' if cpu_has_avx512bf16() else 'lacks'} AVX512-BF16: left to itself, bitsandbytes would take the "
      f"{'packed' if cpu_has_avx512bf16() else 'portable'} path here")

# %% [markdown]
# The decoder's linears are now about a quarter of their FP16 size, statistics included, while the parts that
# stayed 16-bit keep their bytes: their share of the total grows, as the line above and the chart show.
#
# ## Step 9: caption in NF4

# %%
nf4 = run_precision_step(nf4_step, model, tokenizer, images, params, budget, reference, nf4_load)
record(params, nf4.record)
print(drift_line(nf4.drift.report))
print(f"caption peak {fmt_bytes(nf4.run.memory.peak_bytes)} | x{nf4.run.memory.peak_bytes / fp16.run.memory.peak_bytes:.2f} "
      f"FP16's peak")
with torch.inference_mode():
    embeds, im_mask = prompt_batch(model, tokenizer, images[:1], image_size=params.image_size)
nf4_plora = plora_effect(model, embeds, im_mask)
print(f"PLoRA in NF4: logits with vs without im_mask first differ at position {nf4_plora.first_difference} "
      f"(first image token {nf4_plora.first_image_position}); largest difference before it {nf4_plora.max_diff_before_image:g}")

# %% [markdown]
# Sixteen levels per weight instead of 256: the drift line against FP32 says what that did to the captions and
# logits here, and the PLoRA line repeats Step 6's check on the 4-bit model.

# %% tags=["nbval-ignore-output"]
speeds["NF4"] = generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                                 image_size=params.image_size, repeats=1)
print(f"NF4: {speeds['NF4']} | x{speeds['NF4'].tokens_per_s / speeds['FP16'].tokens_per_s:.2f} FP16's speed")
layer_name, layer = largest_quantized_linear(model)
nf4_costs = [matmul_cost(layer, tokens, device=params.device) for tokens in (1, embeds.shape[1])]
for cost in nf4_costs:
    print(f"NF4 {cost} | dequantizing alone takes x{cost.dequantize_s / cost.fp16_matmul_s:.2f} the product")

# %% [markdown]
# ## Step 10: the three side by side

# %%
del model, layer
free(params.device)
rows = [("FP16", fp16_weights, fp16.run, fp16.drift.report), ("INT8", int8_weights, int8.run, int8.drift.report),
        ("NF4", nf4_weights, nf4.run, nf4.drift.report)]
print(f"{'':5s} {'weights':>11s} {'vs FP16':>7s} {'caption peak':>13s} {'exact':>6s} {'=FP32':>6s} {'top-1':>6s} "
      f"{'max|diff|':>9s}")
for name, weights, run, q in rows:
    stats = q.logit_stats
    print(f"{name:5s} {fmt_bytes(weights):>11s} {weights / fp16_weights:7.2f} {fmt_bytes(run.memory.peak_bytes):>13s} "
          f"{q.exact_match:6.0%} {q.agreement_with_reference:6.0%} {stats['top1_agreement']:6.1%} "
          f"{stats['max_abs_diff']:9.3g}")

# %%
from xcomp_lab.course.charts import steps_chart

steps_chart([fp16.record, int8.record, nf4.record], budget_bytes=budget.limit_bytes,
            title=f"FP16, INT8 and NF4 under a {params.budget_gb:g} GB budget ({params.scale}, {params.device})")

# %% [markdown]
# Each bar is one caption's peak: weights at the bottom, then the KV cache and the activations, which
# quantization does not touch; above each bar, the exact match on the held-out scenes.
#
# ## What we learned

# %%
print(f"- Weights: FP16 {fmt_bytes(fp16_weights)}, INT8 {fmt_bytes(int8_weights)} (x{int8_weights / fp16_weights:.2f}), "
      f"NF4 {fmt_bytes(nf4_weights)} (x{nf4_weights / fp16_weights:.2f}), statistics included; the prediction "
      f"(linears but the output head quantized, the rest 16-bit) is off by at most "
      f"{max(abs(int8_weights / predicted['int8'] - 1), abs(nf4_weights / predicted['nf4'] - 1)):.1%}.")
print(f"- A caption peaks at {fmt_bytes(int8.run.memory.peak_bytes)} in INT8 and {fmt_bytes(nf4.run.memory.peak_bytes)} "
      f"in NF4 against {fmt_bytes(fp16.run.memory.peak_bytes)} in FP16: activations and KV cache stay 16-bit.")
print(f"- Against FP32 captions: FP16 agrees on {fp16.drift.report.agreement_with_reference:.0%}, INT8 on "
      f"{int8.drift.report.agreement_with_reference:.0%}, NF4 on {nf4.drift.report.agreement_with_reference:.0%} of "
      f"{n_eval}; top-1 logit agreement {fp16.drift.report.logit_stats['top1_agreement']:.1%} / "
      f"{int8.drift.report.logit_stats['top1_agreement']:.1%} / {nf4.drift.report.logit_stats['top1_agreement']:.1%}.")
print(f"- PLoRA survives quantization: with vs without im_mask the logits first differ at the first image token "
      f"in INT8 ({int8_plora.acts_only_from_image_on}) and NF4 ({nf4_plora.acts_only_from_image_on}).")

# %% tags=["nbval-ignore-output"]
where = torch.cuda.get_device_name(0) if params.device == "cuda" else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
print(f"- Speed on {where}: " + ", ".join(f"{name} {s.tokens_per_s:.1f} tokens/s" for name, s in speeds.items())
      + f"; one decode-step product costs x{int8_costs[0].quantized_s / int8_costs[0].fp16_matmul_s:.1f} (INT8) and "
      f"x{nf4_costs[0].quantized_s / nf4_costs[0].fp16_matmul_s:.1f} (NF4) the 16-bit product of the same layer.")

# %% [markdown]
# **Questions.** (1) Why does NF4 not reach a quarter of FP16's weights, and which part would you have to
# quantize to get closer? (2) The output head is left in 16 bits by default: what would you expect to happen to
# the logits if it were quantized too? (3) On a GPU with room for the FP16 model, when is NF4 still worth its
# drift?
