# %% [markdown]
# # 05 · device_map fills cards layer by layer; offloading frees the card at the cost of speed, not of the caption
#
# How `device_map="auto"` and `max_memory` decide where each part of the model goes (planned at full scale
# without allocating a byte), then offloading measured on this machine: memory on the device, peak, speed,
# and the caption compared with the model that was not offloaded.

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
# ## Step 1: size every module of the full model, without its weights
#
# `from_pretrained(..., device_map="auto", max_memory=...)` works in two moves, both done by `accelerate`.
# First it sizes every module from its shapes alone. Then it fills the devices in order (GPU 0, GPU 1, ...,
# then `cpu`, then `disk`), module by module, and never cuts a module whose class is in the model's
# `_no_split_modules`: a decoder layer adds its input back to its output (the residual), so all of it must
# run on one device. Both moves only read shapes, so we can plan for cards this machine does not have, on the
# `meta` device.

# %%
import torch
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.estimate import meta_model, plan_device_map, plan_from_pretrained
from xcomp_lab.core.units import GB, fmt_bytes

full = meta_model(config_for_scale("full"))
print(f"never split: {sorted(full._no_split_modules)}")
two_cards = plan_from_pretrained(full, {0: "24GB", 1: "24GB"}, dtype="float32")
print(f"full model in FP32: {fmt_bytes(two_cards.total_bytes)} (parameters and rotary tables) | "
      f"one 24 GB card: {fmt_bytes(24 * GB)} | two: {fmt_bytes(48 * GB)}")

# %% [markdown]
# The FP32 model is larger than one 24 GB card and smaller than two.
#
# ## Step 2: two 24 GB cards, FP32
#
# With several GPUs, `from_pretrained(device_map="auto")` first evens out the cards (transformers'
# `get_balanced_memory`), then fills them in order. `plan_from_pretrained` makes the same two calls:

# %%
print(two_cards.describe())
print(f"no-split modules cut across devices: {list(two_cards.split_modules) or 'none'} | "
      f"offloaded to cpu or disk: {fmt_bytes(two_cards.offloaded_bytes)}")

# %% [markdown]
# Every decoder layer sits whole on one card and nothing is offloaded. Balancing allows GPU 0 only about half
# the model plus a margin, and GPU 1 its whole card for the rest. What the plan does not count: activations,
# the KV cache and autocast's copies (notebooks 01 and 04) must fit in what the weights leave free, on each card.
#
# **Each card's peak.** The estimator replays the caption with the model dispatched by accelerate's own hooks
# over two stand-in cards, and counts every allocation on the card where it happens: the hidden state that a
# hook copies to the next card, and the logits it copies back to the first one at the end.

# %%
from xcomp_lab.estimate import estimate_split_caption

split = estimate_split_caption("full", two_cards, dtype="float32", new_tokens=params.max_new_tokens,
                               budget="24GB", label="2x24GB-fp32")
print(split.summary())
print(split.transfer_table(min_bytes=2**20))

# %% [markdown]
# Measured on two H100s (each emulating a 24 GB card, `python -m xcomp_lab.tools.gpu_split_run`, results committed in
# `results/full-h100x2/`), against the same prediction on the map the load really made, and the speed against
# the whole model on one card:

# %%
from xcomp_lab.lessons.device_map import split_report

print(split_report("../results/full-h100x2/split.jsonl"))

# %% [markdown]
# The ratios say how close the per-card prediction came on real cards. The speed says what the split costs:
# `device_map="auto"` runs the cards one after the other (pipeline without overlap), so a second card adds
# memory, not speed, and every new token's hidden state crosses between them.
#
# ## Step 3: one 24 GB card and the CPU, FP32
#
# With `max_memory={0: "24GB", "cpu": "64GiB"}` the card fills first and the rest goes to CPU memory:

# %%
one_card = plan_device_map(full, {0: "24GB", "cpu": "64GiB"}, dtype="float32")
print(one_card.describe())
print(f"offloaded to the CPU: {fmt_bytes(one_card.offloaded_bytes)} ({one_card.offloaded_bytes / one_card.total_bytes:.0%} "
      f"of the model) | no-split modules cut: {list(one_card.split_modules) or 'none'}")
largest_name, largest_bytes = max(one_card.module_bytes.items(), key=lambda kv: kv[1])
print(f"left free on GPU 0: {fmt_bytes(one_card.max_memory[0] - one_card.bytes_per_device()[0])} | largest module of the map: "
      f"{largest_name}, {fmt_bytes(largest_bytes)}")
print(f"buffers of the offloaded modules that stay on GPU 0 anyway: {fmt_bytes(one_card.offloaded_buffer_bytes)} "
      f"(accelerate warns with the same number: {any(str(one_card.offloaded_buffer_bytes) in n for n in one_card.notes)})")

# %% [markdown]
# The card takes whole layers up to its limit, less room kept for the largest module, which it may have to
# load from the CPU; the last layers, the output head and the vision tower go to the CPU. The parameters move, but each offloaded
# layer's rotary tables are buffers, and `dispatch_model` keeps buffers on the GPU unless told
# `offload_buffers=True`: memory the map does not show on the card.
#
# Half precision changes the picture. The same plans in FP16:

# %%
for card_gb in (24, 16):
    plan = plan_device_map(full, {0: f"{card_gb}GB", "cpu": "64GiB"}, dtype="float16")
    on_card = plan.bytes_per_device()[0]
    to_cpu = [n for n, d in plan.placement.items() if "cpu" in d and not n.startswith("model.layers.")]
    print(f"FP16, {card_gb} GB card + CPU: {fmt_bytes(on_card)} on the card, {len(plan.layers_per_device()[0])} "
          f"decoder layers | offloaded {fmt_bytes(plan.offloaded_bytes)}: {len(plan.layers_per_device().get('cpu', []))} "
          f"layers{' + ' + ', '.join(to_cpu) if to_cpu else ''}")

# %% [markdown]
# In FP16 the whole model fits a 24 GB card; a 16 GB card takes all but the last few layers, the head and the
# vision tower. Offloading is the last resort after half precision, not the first.
#
# ## Step 4: the reference on this machine
#
# Now for real, on this device. First the model without offloading, in FP16, captioned as before:

# %%
import gc

from xcomp_lab.memory.budget import resolve_device
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step


step = STEPS["fp16"]
print(step.describe())
model, tokenizer = load_for_step(step, params)
cfg = model.config
budget = course_budget(params, model.config)
images = batch_of_images(params)
reference, reference_record = run_step(step, model, tokenizer, images, params, budget)
record(params, reference_record)
print(f"caption: {reference.captions[0]!r}")

# %% [markdown]
# The speed of the reference, timed outside the measurement (the CPU accounting slows every operation):

# %% tags=["nbval-ignore-output"]
from time import perf_counter

from xcomp_lab.run.captioning import caption_images


def seconds_per_caption(model):
    start = perf_counter()
    caption_images(model, tokenizer, images, max_new_tokens=params.max_new_tokens, image_size=params.image_size)
    return perf_counter() - start


reference_s = seconds_per_caption(model)
print(f"reference: {reference_s:.2f} s for {len(images)} caption(s), {reference.new_tokens / reference_s:.1f} new tokens/s")
del model  # before loading the next: at full scale two models may not fit together
gc.collect()
if params.device == "cuda":
    torch.cuda.empty_cache()

# %% [markdown]
# ## Step 5: offload half the decoder layers
#
# On a GPU, layers mapped to `"cpu"` keep their weights in CPU memory; a hook on each module copies its weights
# to the GPU just before it runs and drops them after. On a CPU the weights already live in CPU memory, so the
# only place to offload to is `"disk"`: `accelerate` supports disk offload with the CPU as the execution device
# (with the CPU as main device, only `"disk"` modules are offloaded; `"cpu"` modules simply stay). The map is
# written by hand here, so that exactly the last half of the layers moves:
#
# ```python
# model = AutoModel.from_pretrained(path, dtype=torch.float16, trust_remote_code=True,
#                                   device_map=device_map, offload_folder=folder)  # changed line
# ```

# %% [markdown]
# **Exercise 5.1: predict, then measure.** The next cells move the last half of the decoder layers off the
# device. Predict the weights still resident on the device afterwards, as a multiple of the reference's resident
# weights (Step 4): a plain number, 0.5 for half. Write it into `my_offload_resident_x`; the cell after the
# offloaded caption compares it with this run, and `answer_5_1.solution()` shows the worked reasoning.

# %%
my_offload_resident_x = None  # your prediction: resident weights after offloading / before

# %%
import os
import tempfile

from xcomp_lab.model.loading import load_model
from xcomp_lab.estimate import offload_layers_map, quiet_accelerate, summarize_map

main, target = (0, "cpu") if params.device == "cuda" else ("cpu", "disk")
n_offloaded = cfg.num_hidden_layers // 2
device_map = offload_layers_map(cfg, n_offloaded, main, target)
folder = tempfile.TemporaryDirectory(prefix="xcomp-offload-")
with quiet_accelerate():  # its log line names the devices in a random order
    model, tokenizer = load_model(params.model_name_or_path, scale=params.scale, dtype="float16",
                                  device_map=device_map, offload_folder=folder.name,  # changed line
                                  attn_implementation=params.attn_implementation)
placed = summarize_map(model, model.hf_device_map, dtype="float16")
print(placed.describe())
offloaded_layer = model.model.layers[-1]
print(f"last layer's weights are on: {offloaded_layer.attention.wqkv.base_layer.weight.device} | resident on "
      f"{params.device}: {fmt_bytes(resident_bytes(model, resolve_device(params.device)))}")
hooked = [(name, m._hf_hook) for name, m in offloaded_layer.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
name, hook = hooked[0]
print(f"{len(hooked)} modules of the last layer carry an offload hook, e.g. {name}: {type(hook).__name__}, "
      f"runs on {hook.execution_device}")
if target == "disk":
    index = hook.weights_map.dataset.index
    sources = sorted({os.path.basename(entry.get("safetensors_file", "offload folder")) for entry in index.values()})
    print(f"files written to the offload folder: {len(os.listdir(folder.name))} | the offloaded weights are read from: {sources}")
else:
    print("the offloaded weights wait in CPU memory")

# %% [markdown]
# The offloaded layers' parameters are on the `meta` device: shapes only. A hook on each module with weights
# loads them when the module runs and drops them after. For disk offload, transformers did not copy anything
# into the offload folder here: it points accelerate at the checkpoint's own safetensors file, which it reads
# (and converts, if the dtype differs) each time a layer runs.
#
# Now the same caption under the same budget:

# %%
import dataclasses

offload_step = dataclasses.replace(step, name=f"05-fp16-offload-{target}", title=f"FP16, last {n_offloaded} layers on {target}")
offloaded, offloaded_record = run_step(offload_step, model, tokenizer, images, params, budget,
                                       extra={"device_map": {k: str(v) for k, v in model.hf_device_map.items()}})
record(params, offloaded_record)
same = offloaded.captions == reference.captions
print(f"captions identical to the reference: {same} | {offloaded.captions[0]!r}")
ref_m, off_m = reference.memory, offloaded.memory
print(f"resident weights {fmt_bytes(ref_m.weights_bytes)} -> {fmt_bytes(off_m.weights_bytes)} "
      f"(-{1 - off_m.weights_bytes / ref_m.weights_bytes:.0%}) | peak {fmt_bytes(ref_m.peak_bytes)} -> "
      f"{fmt_bytes(off_m.peak_bytes)} | activations {fmt_bytes(ref_m.activations_bytes)} -> {fmt_bytes(off_m.activations_bytes)}")
expected = ref_m.weights_bytes - placed.offloaded_bytes + placed.offloaded_buffer_bytes
print(f"predicted resident: {fmt_bytes(ref_m.weights_bytes)} - offloaded {fmt_bytes(placed.offloaded_bytes)} "
      f"+ their buffers {fmt_bytes(placed.offloaded_buffer_bytes)} = {fmt_bytes(expected)} | measured "
      f"{fmt_bytes(off_m.weights_bytes)} | x{off_m.weights_bytes / expected:.2f}")
largest = max(p.numel() * 2 for p in offloaded_layer.parameters())
print(f"activations with offloading minus without: {fmt_bytes(off_m.activations_bytes - ref_m.activations_bytes)} | "
      f"largest offloaded weight in FP16: {fmt_bytes(largest)}")

# %%
from xcomp_lab.course.exercises import check

answer_5_1 = check("5.1", my_offload_resident_x, measured=off_m.weights_bytes / ref_m.weights_bytes,
                   reference_bytes=ref_m.weights_bytes, offloaded_bytes=placed.offloaded_bytes,
                   kept_buffer_bytes=placed.offloaded_buffer_bytes, layers=n_offloaded, of_layers=cfg.num_hidden_layers)

# %% [markdown]
# Offloading moves weights, not arithmetic: the same operations run on the same values, so the captions are
# identical. Resident memory drops by the offloaded parameters, less the rotary buffers that stay behind, as
# predicted. During the call each offloaded weight is brought in only while its module runs. On a GPU the
# allocator counts that copy, so the activations grow by the weights in flight. On a CPU the accounting sees only
# tensors that torch operations create, and a weight read from a safetensors file is not one: a difference of
# zero means the loaded weights are the part this measurement cannot see, one weight at a time at most.
#
# The price is time:

# %% tags=["nbval-ignore-output"]
offloaded_s = seconds_per_caption(model)
print(f"offloaded: {offloaded_s:.2f} s for {len(images)} caption(s), {offloaded.new_tokens / offloaded_s:.1f} new tokens/s "
      f"| x{offloaded_s / reference_s:.1f} the reference's time")
del model, offloaded_layer, hooked, hook
gc.collect()
folder.cleanup()

# %% [markdown]
# Every forward pass reads the offloaded weights again, once per generated token: from disk on a CPU, across
# PCIe on a GPU. The ratio above is this run's price; at full scale every token moves the offloaded gigabytes
# again, so the price grows with what is offloaded.
#
# ## What we learned

# %%
gpu0, gpu1 = (two_cards.layers_per_device()[d] for d in (0, 1))
print(f"- The full model in FP32 ({fmt_bytes(two_cards.total_bytes)}) fits two 24 GB cards as {len(gpu0)} + {len(gpu1)} "
      f"whole decoder layers, {fmt_bytes(two_cards.offloaded_bytes)} offloaded.")
print(f"- On one 24 GB card, {fmt_bytes(one_card.offloaded_bytes)} ({one_card.offloaded_bytes / one_card.total_bytes:.0%}) goes "
      f"to the CPU, and {fmt_bytes(one_card.offloaded_buffer_bytes)} of its buffers stay on the card.")
print(f"- Here, offloading {n_offloaded} of {cfg.num_hidden_layers} layers to {target} cut resident weights by "
      f"{1 - off_m.weights_bytes / ref_m.weights_bytes:.0%} and the peak by {1 - off_m.peak_bytes / ref_m.peak_bytes:.0%}; "
      f"the captions were {'identical' if same else 'DIFFERENT'}.")

# %% [markdown]
# **Questions.** (1) Why does `infer_auto_device_map` keep room on GPU 0 for the largest module when it
# offloads? (2) How much `max_memory` would you give a 24 GB card so that the activations of notebook 04 still
# fit beside the weights? (3) The vision tower runs once per caption, the output head once per token: which is
# the cheaper to offload, and why does `device_map="auto"` offload both?
