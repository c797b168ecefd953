# %% [markdown]
# # 05 · device_map places whole decoder layers by each device's limit; offloading frees the weights it moves, keeps the caption, and costs the time to move them
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
# ## With the original's own code: what accelerate may cut
#
# This section runs where `model_name_or_path` is a checkpoint of the original model's own remote code
# (transformers 4.33.2); with the replica it says so and the steps below follow. Those steps plan and offload the
# replica's own layers, so with the original's checkpoint each of their cells is skipped (`if not
# params.original_code`), and "What we learned" reads this section's lines. `device_map` never cuts a module
# whose class the model lists in `_no_split_modules`; every other module may be cut into its children, wherever a
# device's limit falls. The original is built here on the meta device from its checkpoint's own code, at full size,
# and planned with the same accelerate calls: `device_map="auto"` on several GPUs first evens out the cards
# (`get_balanced_memory`), `device_map="sequential"` fills them in order as given.

# %%
from xcomp_lab.core.units import fmt_bytes

if params.original_code:
    from xcomp_lab.lessons.device_map import cut_modules, original_meta_model, plan_original

    original = original_meta_model(params.model_name_or_path, "full", "float32")
    layer_classes = sorted({type(m).__name__ for n, m in original.named_modules() if n.endswith(".layers.0")})
    undeclared = [c for c in layer_classes if c not in original._no_split_modules]
    print(f"the original at full size on meta: {sum(p.numel() for p in original.parameters()):,} parameters | "
          f"_no_split_modules: {original._no_split_modules} | repeated layer classes: {layer_classes} | "
          f"not declared: {undeclared}")
    original_plans = {}
    for max_memory, balanced in (({0: "24GB", 1: "24GB"}, True), ({0: "34.6GB", 1: "10GB"}, False)):
        plan = plan_original(original, max_memory, dtype="float32", balanced=balanced)
        cut = cut_modules(original, plan.device_map, undeclared)
        original_plans["auto" if balanced else "sequential"] = (max_memory, plan, cut)
        print(f"\nFP32, {max_memory}, device_map={'auto' if balanced else 'sequential'}:\n{plan.describe()}")
        print(f"declared classes cut: {cut_modules(original, plan.device_map, original._no_split_modules) or 'none'} | "
              f"{', '.join(undeclared)} cut: {cut or 'none'}")
else:
    print("the replica: its own plans follow (Step 1 prints its _no_split_modules)")

# %% [markdown]
# A decoder layer is never cut: the original declares it. Its vision tower's `CLIPEncoderLayer` is not declared,
# and the lines above say whether a plan cut one: each such layer adds its input back to its output (the residual),
# so a cut one would need both halves' tensors on one device at that addition. The plan reads shapes only; on this
# device, the original through accelerate for real, as its own step `fp32-device-map` loads it
# (`from_pretrained(..., device_map="auto")`), the map the load applied and the caption measured:

# %%
if params.original_code:
    from collections import Counter

    from xcomp_lab.course.steps import course_budget, load_for_step, run_step
    from xcomp_lab.original.steps import get_original_step

    mapped_step = get_original_step("fp32-device-map").step
    model, tokenizer = load_for_step(mapped_step, params)
    devices_used = dict(Counter(str(d) for d in model.hf_device_map.values()))
    print(f"model.hf_device_map: {devices_used} modules per device")
    mapped, mapped_record = run_step(mapped_step, model, tokenizer, batch_of_images(params)[:1], params,
                                     course_budget(params, None))
    record(params, mapped_record)
    from xcomp_lab.course.results import latest_by_step, read_results

    earlier = latest_by_step(read_results(params.results_path)).get("fp32-no-autocast")
    if earlier is not None:
        print(f"the same FP32 caption without a map (an earlier notebook's record): peak {fmt_bytes(earlier['peak_bytes'])} | "
              f"with device_map='auto': {fmt_bytes(mapped.memory.peak_bytes)} | difference "
              f"{fmt_bytes(abs(mapped.memory.peak_bytes - earlier['peak_bytes']))}")
    else:
        print("no fp32-no-autocast record in the results file yet: run notebooks 01-04 first to compare")
    del model, tokenizer
else:
    print("the replica's offloading is measured in Steps 4 and 5")

# %% [markdown]
# The first line counts the devices the map uses; the last compares the caption's peak with the same FP32 caption
# loaded without a map, where an earlier notebook recorded it. On two GPUs each card would hold the layers of the
# plan above, and the hidden state would cross between them.
#
# Offloading is the other thing `max_memory` does: give the main device less than the weights and accelerate puts
# the rest on the CPU (behind a GPU) or on disk (behind a CPU, with `offload_folder`), and its hooks bring each
# offloaded module's weights in when it runs. The same load with half the FP32 weights allowed on the main device,
# then the same caption; the outcome is printed as it happens:

# %%
if params.original_code:
    import dataclasses
    import tempfile

    from transformers import AutoModel, AutoTokenizer
    from xcomp_lab.lessons.quantization import failure_line

    main_device = 0 if params.device == "cuda" else "cpu"
    limits = {main_device: mapped.memory.weights_bytes // 2, **({"cpu": "64GiB"} if params.device == "cuda" else {})}
    offload_folder = tempfile.TemporaryDirectory(prefix="xcomp-lab-05-")
    offload_outcome = None
    try:
        model = AutoModel.from_pretrained(params.model_name_or_path, trust_remote_code=True, device_map="auto",
                                          max_memory=limits, offload_folder=offload_folder.name)
        tokenizer = AutoTokenizer.from_pretrained(params.model_name_or_path, trust_remote_code=True)
        print(f"max_memory={limits}: model.hf_device_map {dict(Counter(str(d) for d in model.hf_device_map.values()))} "
              f"modules per device: {model.hf_device_map}")
        offload_step = dataclasses.replace(mapped_step, name="05-original-offload", title="FP32, half the weights off")
        offloaded, offload_record = run_step(offload_step, model, tokenizer, batch_of_images(params)[:1], params,
                                             course_budget(params, None))
        record(params, offload_record)
        offload_outcome = f"the caption ran, peak {fmt_bytes(offloaded.memory.peak_bytes)}"
    except (KeyError, NotImplementedError, RuntimeError) as error:  # the outcome, as raised
        offload_outcome = failure_line(error)
    print(offload_outcome)
    model = tokenizer = None
    offload_folder.cleanup()
else:
    print("the replica: Step 5 offloads half its decoder layers by a map written by hand")

# %% [markdown]
# The line says what this load and caption did on this device. Where they fail, the error names the line of the
# original's code (or of accelerate) it came through: the map above is accelerate's, the code that runs it is the
# original's and transformers 4.33.2's.
#
# ## Step 1: build the full model without its weights
#
# `from_pretrained(..., device_map="auto", max_memory=...)` works in two moves, both done by `accelerate`.
# First it sizes every module from its shapes alone. Then it fills the devices in order (GPU 0, GPU 1, ...,
# then `cpu`, then `disk`), module by module, and never cuts a module whose class is in the model's
# `_no_split_modules`: a decoder layer adds its input back to its output (the residual), so all of it must
# run on one device. Both moves only read shapes, so we can plan for cards this machine does not have, on the
# `meta` device: tensors with a shape and a dtype and no storage.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    import torch
    from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
    from xcomp_lab.model.scales import config_for_scale
    from xcomp_lab.estimate import plan_from_pretrained
    from xcomp_lab.core.units import GB, fmt_bytes

    with torch.device("meta"):  # every tensor made in this block has a shape and a dtype, and no storage
        full = InternLMXComposer2ForCausalLM(config_for_scale("full"))
    print(f"the full model on {full.device}: {sum(p.numel() for p in full.parameters()):,} parameters, no storage | "
          f"never split: {sorted(full._no_split_modules)}")
    two_cards = plan_from_pretrained(full, {0: "24GB", 1: "24GB"}, dtype="float32")
    fits_one, fits_two = two_cards.total_bytes <= 24 * GB, two_cards.total_bytes <= 48 * GB
    print(f"full model in FP32: {fmt_bytes(two_cards.total_bytes)} (parameters and rotary tables) | one 24 GB card: "
          f"{fmt_bytes(24 * GB)} | two: {fmt_bytes(48 * GB)} | {'fits' if fits_one else 'larger than'} one card, "
          f"{'fits' if fits_two else 'larger than'} two")

# %% [markdown]
# The last line compares the FP32 model with one and with two 24 GB cards (accelerate reads "24GB" as
# 24 x 10⁹ bytes).
#
# ## Step 2: two 24 GB cards, FP32
#
# With several GPUs, `from_pretrained(device_map="auto")` first evens out the cards (transformers'
# `get_balanced_memory`), then fills them in order. `plan_from_pretrained` makes the same two calls on the meta
# model:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    print(two_cards.describe())
    half, largest = two_cards.total_bytes / 2, max(two_cards.module_bytes.values())
    print(f"GPU 0 may hold {fmt_bytes(two_cards.max_memory[0])} = half the model {fmt_bytes(half)} + "
          f"{fmt_bytes(two_cards.max_memory[0] - half)} (x{(two_cards.max_memory[0] - half) / largest:.2f} the largest "
          f"module, {fmt_bytes(largest)}); GPU 1, the last card, keeps its whole {fmt_bytes(two_cards.max_memory[1])}")
    print(f"no-split modules cut across devices: {list(two_cards.split_modules) or 'none'} | "
          f"offloaded to cpu or disk: {fmt_bytes(two_cards.offloaded_bytes)}")

# %% [markdown]
# Balancing caps every card but the last at about an even share of the model plus a margin; the lines above
# give both, and the map that results. What the plan does not count: activations, the KV cache and autocast's
# copies (notebooks 01 and 04) must fit in what the weights leave free, on each card.
#
# **Each card's peak.** The estimator replays the caption with the model dispatched by accelerate's own hooks
# over two stand-in cards, and counts every allocation on the card where it happens: the hidden state that a
# hook copies to the next card, and the logits it copies back to the first one at the end.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.estimate import estimate_split_caption

    split = estimate_split_caption("full", two_cards, dtype="float32", new_tokens=params.max_new_tokens,
                                   budget="24GB", label="2x24GB-fp32")
    print(split.summary())
    print(split.transfer_table(min_bytes=2**20))

# %% [markdown]
# Measured on two H100s (each emulating a 24 GB card, `python -m xcomp_lab.tools.gpu_split_run`, results committed in
# `results/full-h100x2/`), against the same prediction on the map the load really made (read there from
# `model.hf_device_map`), and the speed against the whole model on one card:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.lessons.device_map import split_layers, split_report

    split_path = "../results/full-h100x2/split.jsonl"
    print(split_report(split_path))
    loaded = split_layers(split_path, dtype="float32")
    planned = {card: two_cards.layers_per_device()[card] for card in (0, 1)}
    print(f"the FP32 load's map: {' + '.join(str(len(v)) for v in loaded.values())} decoder layers | the plan above: "
          f"{' + '.join(str(len(v)) for v in planned.values())} | the same layers on the same cards: {loaded == planned}")

# %% [markdown]
# The ratios say how close the per-card prediction came on real cards, and the last line whether the plan
# made here is the map the load made there. The speed says what the split costs: `device_map="auto"` runs the
# cards one after the other (a pipeline without overlap), and every new token's hidden state crosses between
# them.
#
# ## Step 3: one 24 GB card and the CPU, FP32
#
# With `max_memory={0: "24GB", "cpu": "64GiB"}` the card fills first and the rest goes to CPU memory. First
# accelerate's own call on the meta model, as `from_pretrained` makes it with a single GPU:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from collections import Counter

    from accelerate import infer_auto_device_map
    from xcomp_lab.estimate import plan_device_map, quiet_accelerate

    with quiet_accelerate():  # where there is no GPU 0, accelerate logs that it is not available: planning needs none
        device_map = infer_auto_device_map(full, max_memory={0: "24GB", "cpu": "64GiB"},
                                           no_split_module_classes=full._no_split_modules, dtype=torch.float32)
    print(f"{len(device_map)} entries, modules per device: {dict(Counter(device_map.values()))} | first: "
          f"{list(device_map.items())[:2]} | last: {list(device_map.items())[-2:]}")
    one_card = plan_device_map(full, {0: "24GB", "cpu": "64GiB"}, dtype="float32")
    print(f"plan_device_map, which makes the same call and sums the bytes: same map: {one_card.device_map == device_map}")
    print(one_card.describe())
    print(f"offloaded to the CPU: {fmt_bytes(one_card.offloaded_bytes)} ({one_card.offloaded_bytes / one_card.total_bytes:.0%} "
          f"of the model) | no-split modules cut: {list(one_card.split_modules) or 'none'}")
    largest_name, largest_bytes = max(one_card.module_bytes.items(), key=lambda kv: kv[1])
    left = one_card.max_memory[0] - one_card.bytes_per_device()[0]
    print(f"left free on GPU 0: {fmt_bytes(left)} | largest module of the map: {largest_name}, {fmt_bytes(largest_bytes)} | "
          f"room kept for it: {left >= largest_bytes}")
    print(f"buffers of the offloaded modules that stay on GPU 0 anyway: {fmt_bytes(one_card.offloaded_buffer_bytes)} "
          f"(accelerate warns with the same number: {any(str(one_card.offloaded_buffer_bytes) in n for n in one_card.notes)})")

# %% [markdown]
# The card takes whole layers up to its limit, less room kept for the largest module, which it may have to
# load from the CPU (the last line but one checks that room); what is left goes to the CPU, the parts listed
# above. The parameters move, but each offloaded layer's rotary tables are buffers, and `dispatch_model` keeps
# buffers on the GPU unless told `offload_buffers=True`: memory the map does not show on the card.
#
# Half precision changes the picture. The same plans in FP16:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    for card_gb in (24, 16):
        plan = plan_device_map(full, {0: f"{card_gb}GB", "cpu": "64GiB"}, dtype="float16")
        on_card = plan.bytes_per_device()[0]
        to_cpu = [n for n, d in plan.placement.items() if "cpu" in d and not n.startswith("model.layers.")]
        print(f"FP16, {card_gb} GB card + CPU: {fmt_bytes(on_card)} on the card, {len(plan.layers_per_device()[0])} "
              f"decoder layers | offloaded {fmt_bytes(plan.offloaded_bytes)}: {len(plan.layers_per_device().get('cpu', []))} "
              f"layers{' + ' + ', '.join(to_cpu) if to_cpu else ''}"
              f" | {'the whole model fits the card' if plan.offloaded_bytes == 0 else 'part of it goes to the CPU'}")

# %% [markdown]
# Each line ends with whether half precision alone fits the model on that card. Where it does, offloading is not
# needed at all: it is the last resort after half precision, not the first.
#
# ## Step 4: the reference on this machine
#
# Now for real, on this device. First the model without offloading, in FP16:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
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

# %% [markdown]
# One caption measured in plain PyTorch: on a GPU each device keeps its own counters, read with
# `torch.cuda.memory_allocated(i)` and `torch.cuda.max_memory_allocated(i)` after
# `torch.cuda.reset_peak_memory_stats(i)` (over several cards, one reading per card); a CPU keeps none, so there
# the course's tensor accounting (`xcomp_lab.memory.measure`) stands in.

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.memory import measure
    from xcomp_lab.run.captioning import caption_images

    caption = lambda model: caption_images(model, tokenizer, images, max_new_tokens=params.max_new_tokens,
                                           image_size=params.image_size)
    if params.device == "cuda":
        cards = range(torch.cuda.device_count())
        for i in cards:
            torch.cuda.reset_peak_memory_stats(i)
        before = {i: torch.cuda.memory_allocated(i) for i in cards}
        captions = caption(model)
        after = {i: torch.cuda.memory_allocated(i) for i in cards}
        for i in cards:
            print(f"cuda:{i} (torch.cuda counters) | before {fmt_bytes(before[i])} | peak "
                  f"{fmt_bytes(torch.cuda.max_memory_allocated(i))} | after {fmt_bytes(after[i])}: the call kept "
                  f"{fmt_bytes(after[i] - before[i])}")
        torch._C._cuda_clearCublasWorkspaces()  # PyTorch's documented way to free them (CUDA semantics, cuBLAS workspaces)
        freed = sum(after[i] - torch.cuda.memory_allocated(i) for i in cards)
        print(f"freeing cuBLAS's workspaces returns {fmt_bytes(freed)}: "
              + ("they are what the call kept" if freed else "what the call kept is something else"))
    else:
        with measure("cpu", model=model) as meter:
            captions = caption(model)
        r = meter.result
        print(f"cpu (the course's tensor accounting) | before {fmt_bytes(r.start_bytes)} | peak {fmt_bytes(r.peak_bytes)} "
              f"| after {fmt_bytes(r.end_bytes)}: the call kept {fmt_bytes(r.end_bytes - r.start_bytes)}")

# %% [markdown]
# What a call keeps is memory it made and did not free. On a GPU, PyTorch gives each pair of cuBLAS handle and
# CUDA stream that runs a matrix multiply needing one a workspace, and keeps it until
# `torch._C._cuda_clearCublasWorkspaces()` is called (PyTorch documentation, "CUDA semantics", cuBLAS
# workspaces): the first call of a process makes it, later calls find it allocated. The next call, timed outside
# any measurement (the CPU accounting slows every operation), runs the same matrix multiplies again, so that
# the measured calls after it start with whatever they keep already allocated and count it in none of their
# activations:

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    from time import perf_counter


    def seconds_per_caption(model):
        start = perf_counter()
        caption(model)
        return perf_counter() - start


    reference_s = seconds_per_caption(model)
    print(f"reference: {reference_s:.2f} s for {len(images)} caption(s)")

# %% [markdown]
# Now the same caption measured by the course's step, which records it:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    reference, reference_record = run_step(step, model, tokenizer, images, params, budget)
    record(params, reference_record)
    print(f"caption: {reference.captions[0]!r} | the same as the plain call's: {reference.captions == captions}")
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
if not params.original_code:  # the replica's step; the original's code is shown above
    import os
    import tempfile

    from xcomp_lab.model.loading import load_model
    from xcomp_lab.estimate import offload_layers_map, summarize_map

    main, target = (0, "cpu") if params.device == "cuda" else ("cpu", "disk")
    n_offloaded = cfg.num_hidden_layers // 2
    device_map = offload_layers_map(cfg, n_offloaded, main, target)
    folder = tempfile.TemporaryDirectory(prefix="xcomp-offload-")
    with quiet_accelerate():  # its log line names the devices in a random order
        model, tokenizer = load_model(params.model_name_or_path, scale=params.scale, dtype="float16",
                                      device_map=device_map, offload_folder=folder.name,  # changed line
                                      attn_implementation=params.attn_implementation)
    away = [n for n, d in model.hf_device_map.items() if d == target]
    print(f"model.hf_device_map, the map the load applied: modules per device {dict(Counter(str(d) for d in model.hf_device_map.values()))} "
          f"| on {target}: {away[0]} ... {away[-1]}")
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
        written = len(os.listdir(folder.name))
        print(f"files written to the offload folder: {written} | the offloaded weights are read from: {sources}"
              + (" | nothing copied: accelerate reads the checkpoint's own file" if written == 0 else ""))
    else:
        print("the offloaded weights wait in CPU memory")
    with measure(params.device) as meter:
        moved = hook.weights_map["weight"].to(hook.execution_device)  # what the hook does before its module runs
    seen = meter.result.peak_bytes - meter.result.start_bytes
    print(f"bringing {name}.weight in as its hook does: {fmt_bytes(moved.nbytes)} on {moved.device}, {fmt_bytes(seen)} "
          f"of it seen by the measurement")
    del moved

# %% [markdown]
# The offloaded layers' parameters are on the device the line says (`meta`: shapes only). A hook on each
# module with weights loads them when the module runs and drops them after; with disk offload, the line above
# says whether transformers copied anything into the offload folder or pointed accelerate at the checkpoint's
# own safetensors file. The last line brings one weight in as its hook does and says how much of it the
# measurement sees.
#
# Now the same caption under the same budget:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
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

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.course.exercises import check

    answer_5_1 = check("5.1", my_offload_resident_x, measured=off_m.weights_bytes / ref_m.weights_bytes,
                       reference_bytes=ref_m.weights_bytes, offloaded_bytes=placed.offloaded_bytes,
                       kept_buffer_bytes=placed.offloaded_buffer_bytes, layers=n_offloaded, of_layers=cfg.num_hidden_layers)

# %% [markdown]
# Offloading moves weights, not arithmetic: the same operations run on the same values, so the captions should
# be identical, and the first line says whether they are. The predicted line checks that resident memory drops
# by the offloaded parameters, less the rotary buffers that stay behind. During the call each offloaded weight
# is brought in only while its module runs, and the measurement counts that copy (Step 5's last line): whether
# it raises the peak depends on what else is alive at that moment. The activations of the two runs, taken apart:

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    from xcomp_lab.lessons.device_map import offload_effect

    largest_weight = max(p.numel() * p.element_size() for p in offloaded_layer.parameters())
    effect = offload_effect(ref_m, off_m, largest_weight_bytes=largest_weight, seen_weight_bytes=seen)
    print(effect)

# %% [markdown]
# Activations count from each run's start, less what was already allocated there: memory a run makes and keeps
# counts in its own activations and in no later run's, which is why the difference is corrected before it is
# read. The last line reads what is left.
#
# What it costs in time:

# %% tags=["nbval-ignore-output"]
if not params.original_code:  # the replica's step; the original's code is shown above
    offloaded_s = seconds_per_caption(model)
    passes = -(-offloaded.new_tokens // len(images))  # forward passes: the prefill and each decode step
    moved_bytes = placed.offloaded_bytes * passes
    extra_s = offloaded_s - reference_s
    print(f"reference: {reference.new_tokens / reference_s:.1f} new tokens/s | offloaded: {offloaded_s:.2f} s for {len(images)} "
          f"caption(s), {offloaded.new_tokens / offloaded_s:.1f} new tokens/s | x{offloaded_s / reference_s:.1f} the reference's time")
    print(f"{passes} forward passes x {fmt_bytes(placed.offloaded_bytes)} offloaded = {fmt_bytes(moved_bytes)} brought in | "
          + (f"{extra_s:.2f} s more: {fmt_bytes(moved_bytes / extra_s)}/s" if extra_s > 0 else "no slower in this run"))
    del model, offloaded_layer, hooked, hook
    gc.collect()
    folder.cleanup()

# %% [markdown]
# Every forward pass brings the offloaded weights in again, once per generated token: from the offload folder
# on a CPU, across PCIe from CPU memory on a GPU. The lines above are this run's price and the rate it implies;
# the bytes brought in grow with what is offloaded and with the tokens generated.
#
# ## What we learned

# %%
if not params.original_code:  # the replica's step; the original's code is shown above
    gpu0, gpu1 = (two_cards.layers_per_device()[d] for d in (0, 1))
    print(f"- The full model in FP32 ({fmt_bytes(two_cards.total_bytes)}) goes on two 24 GB cards as {len(gpu0)} + {len(gpu1)} "
          f"whole decoder layers, {fmt_bytes(two_cards.offloaded_bytes)} offloaded; the load on two H100s made "
          f"{'the same map' if loaded == planned else 'a different map'}.")
    print(f"- On one 24 GB card, {fmt_bytes(one_card.offloaded_bytes)} ({one_card.offloaded_bytes / one_card.total_bytes:.0%}) goes "
          f"to the CPU, and {fmt_bytes(one_card.offloaded_buffer_bytes)} of its buffers stay on the card.")
    print(f"- Here, offloading {n_offloaded} of {cfg.num_hidden_layers} layers to {target} cut resident weights by "
          f"{1 - off_m.weights_bytes / ref_m.weights_bytes:.0%} and the peak by {1 - off_m.peak_bytes / ref_m.peak_bytes:.0%}; "
          f"the captions were {'identical' if same else 'DIFFERENT'}.")
    verdict = effect.splitlines()[-1]
    print(f"- During the offloaded caption, {verdict}.")
else:
    _, auto_plan, auto_cut = original_plans["auto"]
    sequential_memory, _, sequential_cut = original_plans["sequential"]
    auto_layers = auto_plan.layers_per_device
    print(f"- The original's code declares {original._no_split_modules} only; on two 24 GB cards (device_map='auto') "
          f"its FP32 model goes as {' + '.join(str(len(auto_layers.get(card, []))) for card in (0, 1))} whole decoder "
          f"layers, {len(auto_cut)} vision layer(s) cut.")
    print(f"- With {sequential_memory} (device_map='sequential') accelerate cut "
          + (f"{', '.join(sequential_cut)} ({', '.join(undeclared)}, undeclared) across the cards."
             if sequential_cut else "no undeclared layer."))
    print(f"- Here, device_map='auto' put the model's modules on {len(devices_used)} device(s) ({devices_used}); the "
          f"caption peaked at {fmt_bytes(mapped.memory.peak_bytes)}.")
    print(f"- With half the FP32 weights allowed on {main_device}: {offload_outcome}.")

# %% [markdown]
# **Questions.** (1) Why does `infer_auto_device_map` keep room on GPU 0 for the largest module when it
# offloads? (2) How much `max_memory` would you give a 24 GB card so that the activations of notebook 04 still
# fit beside the weights? (3) The vision tower runs once per caption, the output head once per token: which is
# the cheaper to offload, and why does `device_map="auto"` offload both?
