# %% [markdown]
# # 07 · Memory forensics: the weights are the floor, the prefill is the spike, the KV cache climbs slowly
#
# One FP16 caption, read with the tools PyTorch gives: the CUDA allocator's counters and summary, a memory
# snapshot (every allocation with the line of code that made it) and its viewer, and a timeline of the call with
# its phases marked. On a CPU, the course's tensor accounting stands in for the allocator. Then what none of these
# tools can see.

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
# ## Step 1: load the model, measured in plain PyTorch
#
# The fixed quick start of notebook 02: FP16 at load. On a GPU the caching allocator counts every byte it hands
# out: `torch.cuda.reset_peak_memory_stats()` before the load, then `torch.cuda.memory_allocated()` (what is in
# use now) and `torch.cuda.max_memory_allocated()` (the highest since the reset). A CPU has no such counters; the
# course's tensor accounting cannot see what safetensors reads from the file either, so there the resident weights
# are summed from the model's parameters and buffers, and the load's peak stays unknown.

# %%
import gc
import time

import torch
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.steps import STEPS, load_for_step

cuda = params.device == "cuda"
step = STEPS["fp16"]
print(step.describe())
if cuda:
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
model, tokenizer = load_for_step(step, params)
load_seconds = time.perf_counter() - started
if cuda:
    weights, load_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    print(f"torch.cuda.memory_allocated() after the load {fmt_bytes(weights)} | torch.cuda.max_memory_allocated() "
          f"during it {fmt_bytes(load_peak)}, {fmt_bytes(load_peak - weights)} of it gone once the load returned")
else:
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(f"parameters + buffers after the load {fmt_bytes(weights)} | the load's peak: not visible on a CPU")

# %% [markdown]
# These bytes are the floor of everything that follows: they stay for as long as the model does.
#
# ## Step 2: caption once, recording everything
#
# On a GPU, the allocator can record the history of every allocation and free, with the Python stack of each.
# The recipe is three lines around the code to inspect (the fourth stops recording):
#
# ```python
# torch.cuda.memory._record_memory_history(max_entries=100_000)  # 1. start recording
# ...                                                             # 2. run the code
# torch.cuda.memory._dump_snapshot("snapshot.pickle")            # 3. save; drop the file on pytorch.org/memory_viz
# torch.cuda.memory._record_memory_history(enabled=None)          #    stop recording
# ```
#
# Here the code is one measured caption (`caption_timeline`: the step's settings, the budget, a results record),
# which marks the phases on the timeline: `vision` when the vision tower starts, `prefill` at the decoder's first
# call (the whole prompt at once), `decode` at each later call (one new token per call). On a CPU the accounting
# samples memory at every allocation. On a GPU each marker also reads the allocator's allocation counter, so
# that Step 5 can place the markers in the recorded history. `torch.cuda.memory._snapshot()` returns the same
# history as a Python dict, for this notebook to read; a caption at full scale makes tens of thousands of
# allocations (Step 5 counts them), so the recording keeps up to 300,000 entries.

# %%
from xcomp_lab.lessons.forensics import caption_timeline

images = batch_of_images(params)
snapshot_path = params.results_path.parent / "07-memory-snapshot.pickle"
if cuda:
    torch.cuda.memory._record_memory_history(max_entries=300_000, stacks="python")  # 1.
caption = caption_timeline(model, tokenizer, images, params)  # 2.
if cuda:
    snapshot = torch.cuda.memory._snapshot()  # the history as a dict, right after the call
    torch.cuda.memory._dump_snapshot(str(snapshot_path))  # 3.
    torch.cuda.memory._record_memory_history(enabled=None)
run = caption.run
print(f"caption: {run.captions[0]!r} | prompt {run.prompt_tokens} tokens, {run.new_tokens} new")
print(caption.budget.describe())

# %% [markdown]
# The record line splits the peak the usual way: the weights, the KV cache the call built, and everything
# else the call made at its highest point ("activations"). The last line says which budget was in force.
#
# ## Step 3: what the allocator says
#
# On a GPU, PyTorch's caching allocator keeps two figures. **Allocated** is the memory of live tensors.
# **Reserved** is what the allocator holds from the driver (`cudaMalloc`): allocated memory plus freed blocks it
# keeps to reuse, so that the next tensor needs no `cudaMalloc`. `nvidia-smi` shows reserved memory (plus the
# CUDA context), not allocated. `torch.cuda.memory_summary()` prints both, now and at their peak since the last
# reset (the measurement resets the peak when the call starts, and empties the cache when it ends). On a CPU there
# is no caching allocator to ask: the course's tensor accounting counts every storage an operation returns and
# subtracts it when freed, which is "allocated" in the same sense; nothing on a CPU corresponds to reserved memory
# that PyTorch could report.

# %%
if cuda:
    print(torch.cuda.memory_summary(abbreviated=True))
    print(f"torch.cuda.max_memory_allocated() {fmt_bytes(torch.cuda.max_memory_allocated())} | the measured call's "
          f"peak {fmt_bytes(run.memory.peak_bytes)} | torch.cuda.max_memory_reserved() "
          f"{fmt_bytes(torch.cuda.max_memory_reserved())}")
else:
    m = run.memory
    print(f"CPU tensor accounting ({m.kind}) for the call:")
    print(f"  allocated at start {fmt_bytes(m.start_bytes)} (the model's parameters and buffers)")
    print(f"  allocated peak     {fmt_bytes(m.peak_bytes)}")
    print(f"  allocated at end   {fmt_bytes(m.end_bytes)}")
    print("  reserved           (none: the C allocator's free lists are invisible to PyTorch)")

# %% [markdown]
# Does a freed block stay reserved? One plain experiment: a tensor as large as what the call added to the weights,
# freed, then `torch.cuda.empty_cache()`. Reserved memory is read at each moment; the verdict is computed from the
# readings.

# %%
if cuda:
    size = run.memory.peak_bytes - run.memory.start_bytes
    before = torch.cuda.memory_reserved()
    scratch = torch.empty(size, dtype=torch.uint8, device=params.device)
    del scratch
    held = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # reserved for no tensor
    torch.cuda.empty_cache()
    after = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    print(f"reserved now {fmt_bytes(before)}, its peak during the call {fmt_bytes(run.memory.reserved_peak_bytes)} | "
          f"a {fmt_bytes(size)} tensor, freed: {fmt_bytes(held)} reserved for no tensor | after empty_cache(): "
          f"{fmt_bytes(after)}")
    print(f"verdict: reserved now is {'below' if before < run.memory.reserved_peak_bytes else 'at'} its peak during "
          f"the call; the freed block {'stayed' if held >= size else 'did not stay'} reserved, and empty_cache() "
          f"{'gave it back' if after < size else 'kept it'}")
else:
    print("a CPU has no cache of freed blocks that PyTorch reports: freed tensors go back to the C allocator")

# %% [markdown]
# Reserved memory that holds no tensor is what makes a process look full in `nvidia-smi` while PyTorch has room.
# The measurement calls `empty_cache()` after every call: the verdict says where that left reserved memory against
# its peak during the call, and what a freed block does until `empty_cache()`.
#
# ## Step 4: the snapshot, and PyTorch's viewer
#
# The snapshot holds every allocation of the recorded call with its stack. Dropped on
# [pytorch.org/memory_viz](https://pytorch.org/memory_viz), it draws each tensor as a band over time;
# `torch.cuda._memory_viz.trace_plot(snapshot)` writes the same viewer as one HTML file, offline (the file still
# loads the viewer's script from the web when opened). Read in Python, the snapshot ranks the allocations and
# names the line of code behind each. Snapshots exist on CUDA only; on a CPU the timeline of Step 5 and the OOM
# report of notebook 01 (which names the operation that failed) are what the accounting offers instead.

# %%
from xcomp_lab.lessons.forensics import largest_allocations

if cuda:
    from torch.cuda import _memory_viz

    html = _memory_viz.trace_plot(snapshot)
    html_path = snapshot_path.with_suffix(".html")
    html_path.write_text(html)
    script = next((w.strip('"') for w in html.split() if w.startswith('"https://')), "none")
    print(f"snapshot {snapshot_path} ({snapshot_path.stat().st_size / 2**20:.1f} MiB of pickle) | viewer "
          f"{html_path} ({len(html) / 2**20:.1f} MiB; the script it loads: {script})")
    for a in largest_allocations(snapshot, n=6, device=torch.cuda.current_device()):
        print(f"{a.count:4d} x {fmt_bytes(a.size):>10s}  {a.where}")
else:
    print("no snapshot on a CPU: torch.cuda.memory._record_memory_history needs a CUDA device")

# %% [markdown]
# On a GPU these lines rank the call's allocations by size, each with the line of model code that made it and
# how many times it happened; Step 6 computes from the shapes which of them the prefill's logits and attention
# scores should be.
#
# ## Step 5: the timeline of the call
#
# On a CPU the timeline is the accounting's samples, one per allocation. On a GPU the allocator keeps counters,
# not a timeline: the course's measurement alone would give the markers only. Here it is rebuilt from the
# recorded history instead: every allocation adds its size and every free takes it away, starting from the bytes
# at the first marker, and each marker is placed after as many allocations as its counter read (the sizes are the
# ones the tensors asked for; the allocator rounds each block up to a multiple of 512 bytes, so its own peak is a
# little higher). The chart starts with the load (from nothing to the weights; the pause between the load and the
# call is left out).

# %%
timeline = caption.timeline(snapshot if cuda else None)
print(f"{timeline.source}: {len(timeline.samples):,} samples | highest {fmt_bytes(timeline.highest_bytes)} | the "
      f"measured peak {fmt_bytes(run.memory.peak_bytes)} (x{timeline.highest_bytes / run.memory.peak_bytes:.4f}) | "
      f"the weights are {weights / run.memory.peak_bytes:.0%} of it")
timeline.chart(load_seconds=load_seconds, weights_bytes=weights, budget_bytes=caption.budget.limit_bytes,
               title=f"One FP16 caption ({params.scale}, {params.device}): load, then the call")

# %% [markdown]
# The weights are the share of the peak the line gives; what the call adds sits on top of them. The same call
# without what was there at its start (the weights), from its start:

# %%
timeline.chart(floor_bytes=timeline.start_bytes, title="The same call, memory above its start (the weights)")

# %% [markdown]
# ## Step 6: read it marker by marker
#
# For each phase: memory at its first marker, the highest sample until the next phase, and the rise between
# them (the decode steps, one marker each, make one phase).
#
# - **start** to **vision**: the image is read and normalised; the pixel tensor is small.
# - **vision**: the vision tower and the projector run and the prompt is embedded: its activations come and go,
#   and the prompt's embeddings stay.
# - **prefill**: the decoder runs over the whole prompt at once.
# - **decode**: one token per call; the KV cache grows by one position per step.
# - **end**: the call is over; what it made is freed, but for what outlives it (Step 7).

# %%
print(timeline.table())
rows = timeline.phases()
highest = max(rows, key=lambda p: p.highest_bytes)
print(f"the highest sample is in the {highest.label} phase, {fmt_bytes(highest.highest_bytes - highest.at_start_bytes)} "
      f"above its marker")

# %% [markdown]
# What makes the prefill's rise? Two suspects grow with the prompt: the logits for every position over the whole
# vocabulary (the original computes them all, then upcasts them to FP32), and eager attention's scores of every
# token against every token, one layer at a time. Each is run alone on the same prompt and measured, next to its
# size from the shapes:

# %% [markdown]
# **Exercise 7.1: predict, then measure.** Before the next cell runs the suspects: predict how much memory the
# output head adds when it scores the whole prompt and the forward upcasts the scores to FP32, in MiB (1024^2
# bytes). You need the batch (`len(images)`), the prompt's tokens (Step 2 printed them) and
# `model.config.vocab_size`. Write the number into `my_logits_mib`; the cell after the measurement compares it
# with this run, and `answer_7_1.solution()` shows the worked reasoning.

# %%
my_logits_mib = None  # your prediction, in MiB

# %%
from xcomp_lab.lessons.forensics import measure_original_prefill_parts, measure_prefill_parts

cfg = model.config
B, T, new = len(images), run.prompt_tokens, run.new_tokens
head_dim = cfg.hidden_size // cfg.num_attention_heads
prefill = timeline.phase("prefill")
spike = prefill.highest_bytes - prefill.at_start_bytes
if params.original_code:  # its chat() builds the prompt itself: the parts run on a hidden state of its shape
    parts = measure_original_prefill_parts(model, caption.im_mask, device=params.device, dtype=torch.float16,
                                           grad=step.grad, use_autocast=step.use_autocast)
else:
    parts = measure_prefill_parts(model, tokenizer, images, device=params.device, grad=step.grad,
                                  use_autocast=step.use_autocast, image_size=params.image_size)
scores = B * cfg.num_attention_heads * T * T * 2  # one layer's FP16 scores, (B, heads, T, T)
logits_both = B * T * cfg.vocab_size * (2 + 4)  # FP16 logits and their FP32 copy, alive together
kv_prompt = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * T * head_dim * 2  # keys and values, FP16
largest = max(parts.attention_bytes, parts.logits_bytes)
print(f"prefill: {fmt_bytes(spike)} above its marker at the highest")
print(f"  one layer's attention, run alone: adds {fmt_bytes(parts.attention_bytes)} | its scores, {B} x "
      f"{cfg.num_attention_heads} heads x {T} x {T} x 2 bytes: {fmt_bytes(scores)} (x{parts.attention_bytes / scores:.1f})")
print(f"  output head + FP32 upcast, run alone: adds {fmt_bytes(parts.logits_bytes)} | {B} x {T} x {cfg.vocab_size:,} "
      f"x (2 + 4) bytes: {fmt_bytes(logits_both)} (x{parts.logits_bytes / logits_both:.2f})")
print(f"  the larger, {'attention' if parts.attention_bytes >= parts.logits_bytes else 'logits'}, is "
      f"{largest / spike:.0%} of the prefill's rise; the rest, {fmt_bytes(spike - largest)}, is what is alive at that "
      f"moment: the prompt's KV cache ({fmt_bytes(kv_prompt)} once complete) and hidden states")

# %%
from xcomp_lab.course.exercises import check

answer_7_1 = check("7.1", my_logits_mib, measured=parts.logits_bytes, batch=B, tokens=T, vocab=cfg.vocab_size)

# %% [markdown]
# The two suspects never overlap: a layer's scores are freed before the next layer starts, and the logits come
# after the last layer. So the spike is the larger of the two on top of what is alive at that moment. The
# attention adds its FP16 scores several times over (the factor is on its line): the masked copy, and for the FP32
# softmax an FP32 copy of the input and the FP32 result (on a GPU the softmax reads FP16 directly, one copy fewer).
# The scores grow with the square of the prompt, the logits with the prompt times the vocabulary: which one wins
# depends on the scale (at full scale, 32 heads against a vocabulary of 92,544), and the line names it.
#
# The decode phase is the slow climb: each step appends one position of keys and values in every layer. Between
# two steps only the model, the cache and the tokens so far remain, so the lowest point of each step should climb
# by about one token's keys and values, while each step's own temporaries (its logits, one layer's activations)
# come and go above it. The last step is left out: its slice runs to the end of the call, where memory is freed.

# %%
per_token = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * head_dim * 2
decode = timeline.phase("decode")
print(f"KV cache per token: 2 x {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} KV heads x "
      f"{head_dim} x 2 bytes x batch {B} = {fmt_bytes(per_token)}")
print(f"KV cache at the end of the call: measured {fmt_bytes(run.memory.kv_cache_bytes)} | formula for {T} + {new - 1} "
      f"tokens (the last one is never fed back) {fmt_bytes(per_token * (T + new - 1))}")
print(f"decode phase, {decode.markers} steps: {fmt_bytes(decode.at_start_bytes)} at its first marker, highest "
      f"{fmt_bytes(decode.highest_bytes)} (rise {fmt_bytes(decode.highest_bytes - decode.at_start_bytes)})")
floors = timeline.floors("decode")[:-1]  # one per decode step; the last step's slice holds the end of the call
if len(floors) >= 2:
    climb = (floors[-1] - floors[0]) / (len(floors) - 1)
    offset = 1 if any(label == "decode-1" for _, _, label in timeline.samples) else 0  # the original's first apart
    print(f"lowest point of decode steps {1 + offset} to {len(floors) + offset}: from {fmt_bytes(floors[0] - timeline.start_bytes)} to "
          f"{fmt_bytes(floors[-1] - timeline.start_bytes)} above the call's start | it climbs {climb:,.0f} bytes per step, the KV cache "
          f"{per_token:,} bytes per token: x{climb / per_token:.3f}")
else:
    print(f"only {decode.markers} decode step(s): too few to see the floor climb (raise max_new_tokens)")
print(f"a 1024-token answer (chat()'s default max_new_tokens) would add {fmt_bytes(1024 * per_token)} of cache")

# %% [markdown]
# The lines compare the cache the call built with the formula, and the climb of the floor with one token's keys
# and values: what climbs beyond the cache is whatever else grows with the sequence (in transformers' `generate`,
# the token ids and the attention mask also gain one position per step). Per token the climb is small next to the prefill's rise; long answers and batches are what make it count.
#
# **The original's own code at decode step 1.** DESIGN.md section 6 traces the original's fitting peaks at full
# size (FP32 without autocast) to its first decode step, where three things of its code and of transformers 4.33.2
# hold memory a plain cache would not: (1) each layer's V is a view into the packed `wqkv` output, and the legacy
# tuple cache stores that view, so it keeps the whole projection alive, queries included; (2) 4.33.2's greedy loop
# still references the prefill's logits; (3) `torch.cat` builds each layer's new K and V while the old cache is
# still referenced. With the original's checkpoint, the hooks of Step 2 read the live tensors when decode step 1
# starts (the cache's views and the storages behind them, and whether the prefill's logits are still
# referenced); the lines below are this FP16 call's. The full-size run of the same code on an H200
# (`results/original-h200/`, `python -m xcomp_lab.tools.original_gpu_run`) recorded where each step peaked.

# %%
from xcomp_lab.lessons.forensics import recorded_peak_phases

if caption.first_decode is not None:
    print(caption.first_decode.lines(timeline))
    full = recorded_peak_phases(*(f"../results/original-h200/results-{n}.jsonl" for n in (1, 2)))
    print("where the original's steps peaked at full size on the H200 (32 layers): "
          + ", ".join(f"{name}: {phase}" for name, phase in full.items()))
else:
    print("the first decode step is read apart for the original's own code only (pass its checkpoint as "
          "model_name_or_path); the replica's cache stores its own K and V tensors")

# %% [markdown]
# Then the model goes, in plain PyTorch: drop the references, collect, and on a GPU hand the cached blocks back.

# %%
del model, tokenizer
gc.collect()
if cuda:
    torch.cuda.empty_cache()

# %% [markdown]
# With the original's checkpoint, the call DESIGN.md's table traces: FP32 without autocast, loaded and captioned as
# the course's `fp32-no-autocast` step, read the same way (on a GPU its memory history is recorded as in Step 2, to
# place the markers). The lines say where this call peaked and what decode step 1 held; the last one scales what
# decode step 1 holds to the released model's depth and vocabulary, which is where a small build and the full
# model can disagree on the phase of the peak (the H200's record above says where the full model's peaked).

# %%
if params.original_code:
    from xcomp_lab.model.original import original_config

    fp32_step = STEPS["fp32-no-autocast"]
    model, tokenizer = load_for_step(fp32_step, params)
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=300_000, stacks="python")
    fp32_call = caption_timeline(model, tokenizer, images, params, step_name=fp32_step.name,
                                 label="07-original-fp32-timeline")
    fp32_timeline = fp32_call.timeline(torch.cuda.memory._snapshot() if cuda else None)
    if cuda:
        torch.cuda.memory._record_memory_history(enabled=None)
    fp32_first = fp32_call.first_decode
    fp32_highest = max(fp32_timeline.phases(), key=lambda p: p.highest_bytes)
    fp32_prefill = fp32_timeline.phase("prefill")
    print(fp32_step.describe())
    print(fp32_timeline.table())
    print(fp32_first.lines(fp32_timeline))
    print(f"this FP32 call peaked in the {fp32_highest.label} phase, "
          f"{fmt_bytes(fp32_highest.highest_bytes - fp32_timeline.start_bytes)} above its start; the prefill's "
          f"highest was {fmt_bytes(fp32_prefill.highest_bytes - fp32_timeline.start_bytes)}, decode step 1's "
          f"{fmt_bytes(fp32_timeline.phase('decode-1').highest_bytes - fp32_timeline.start_bytes)}")
    released = original_config("full")  # the released model's configuration
    per_layer = fp32_first.cache_storage_bytes // fp32_first.layers
    print(f"what decode step 1 holds grows with depth and vocabulary: at the released model's "
          f"{released['num_hidden_layers']} layers the cache's storages come to "
          f"{fmt_bytes(per_layer * released['num_hidden_layers'])} ({fmt_bytes(per_layer)} per layer), its prefill "
          f"logits over {released['vocab_size']:,} entries to "
          f"{fmt_bytes(fp32_first.prompt_tokens * released['vocab_size'] * 4)}; the prefill's rise above its marker, "
          f"{fmt_bytes(fp32_prefill.highest_bytes - fp32_prefill.at_start_bytes)} here, is one layer's attention at "
          f"a time (Step 6) at any depth")
    del model, tokenizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
else:
    print("the replica: no FP32 call here (notebooks 01 and 03 measure it)")

# %% [markdown]
# ## Step 7: what the tools cannot see
#
# - **Reserved but not allocated** (GPU): the cache of freed blocks, and fragmentation: a block split for a
#   small tensor cannot serve a large one. An OOM message says "reserved by PyTorch but unallocated"; the
#   allocated figure does not show it. `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` reduces it.
# - **Workspaces** (GPU): cuBLAS keeps a workspace per stream from its first matrix product on; it comes from
#   PyTorch's allocator but belongs to no tensor of the model, so it appears as allocated memory that no
#   variable holds.
# - **Outside PyTorch** (GPU): the CUDA context (the kernels of every library loaded) and anything a library
#   allocates with `cudaMalloc` itself. `torch.cuda.mem_get_info()` returns the card's free and total memory as
#   the driver sees them, every process included; the allocator's figures do not include the rest.
# - **On a CPU**: scratch space a kernel allocates for itself instead of returning it as a tensor (matrix-product
#   packing buffers, bitsandbytes' dequantized weights in notebook 06), the C allocator's freed-but-kept memory,
#   and the Python interpreter and libraries: the process's resident memory (RSS) includes them, the tensor
#   accounting does not. `/proc/meminfo` is the machine's `mem_get_info()`.
#
# This machine's figures (they vary from run to run):

# %% tags=["nbval-ignore-output"]
from xcomp_lab.lessons.forensics import host_memory

if cuda:
    free_bytes, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    print(f"torch.cuda.mem_get_info(): {fmt_bytes(free_bytes)} free of {fmt_bytes(total)}")
    print(f"during the call: reserved peak {fmt_bytes(run.memory.reserved_peak_bytes)} - allocated peak "
          f"{fmt_bytes(run.memory.peak_bytes)} = {fmt_bytes(run.memory.reserved_peak_bytes - run.memory.peak_bytes)} "
          f"held by the allocator for no tensor")
    print(f"allocated after the call, beyond the weights it started with: "
          f"{fmt_bytes(run.after_release_bytes - run.memory.start_bytes)} (held by no variable of ours)")
    print(f"the card now, the model deleted: {fmt_bytes(total - free_bytes)} in use by all processes, "
          f"{fmt_bytes(reserved)} reserved by PyTorch: {fmt_bytes(total - free_bytes - reserved)} outside its allocator")
else:
    host = host_memory()
    known = host.available_bytes is not None and host.total_bytes is not None
    print(f"/proc/meminfo: {fmt_bytes(host.available_bytes)} available of {fmt_bytes(host.total_bytes)}" if known
          else "no /proc/meminfo on this system: the machine's memory is not read here")
    if host.process_resident_bytes is not None:
        print(f"tensor accounting at the call's peak {fmt_bytes(run.memory.peak_bytes)} | this process's resident memory "
              f"now {fmt_bytes(host.process_resident_bytes)}: the interpreter, the libraries and the C allocator's own "
              f"memory are in the second figure only")

# %% [markdown]
# ## What we learned

# %%
call_share = (run.memory.peak_bytes - weights) / run.memory.peak_bytes
print(f"- The weights ({fmt_bytes(weights)}) are {weights / run.memory.peak_bytes:.0%} of the call's peak "
      f"({fmt_bytes(run.memory.peak_bytes)}); the call itself adds {call_share:.0%}.")
print(f"- The highest sample of the timeline is in the {highest.label} phase. The prefill rises {fmt_bytes(spike)} "
      f"above its marker: one layer's eager attention adds {fmt_bytes(parts.attention_bytes)} "
      f"(x{parts.attention_bytes / scores:.1f} its FP16 scores), the output head's logits "
      f"{fmt_bytes(parts.logits_bytes)}; the larger, {'attention' if parts.attention_bytes >= parts.logits_bytes else 'the logits'}, "
      f"sets the spike.")
print(f"- The KV cache climbs {fmt_bytes(per_token)} per token: {fmt_bytes(run.memory.kv_cache_bytes)} for this "
      f"{T + new - 1}-token call, {fmt_bytes(1024 * per_token)} more for a 1024-token answer.")
if params.original_code:
    print(f"- The original's code at decode step 1 (FP32, no autocast): its cache keeps "
          f"{fmt_bytes(fp32_first.packed_bytes)} beyond its K and V (the packed wqkv outputs), the prefill's logits "
          + (f"are still held ({fmt_bytes(fp32_first.prefill_logits_bytes)})" if fp32_first.prefill_logits_bytes
             else "are freed")
          + f"; that call peaked in the {fp32_highest.label} phase here, and at full size on the H200 in "
            f"{full.get('fp32-no-autocast')}.")
print(f"- The timeline holds {len(timeline.samples):,} samples: "
      + ("every allocation and free of the call, rebuilt from the allocator's recorded history on this GPU." if cuda
         else "one at every allocation of the call, from the tensor accounting on this CPU."))

# %% [markdown]
# **Questions.** (1) Only the last position's logits pick the next token: how would you avoid computing the
# others, and what would it save at each scale? (2) Why can a process fail with "CUDA out
# of memory" while `torch.cuda.memory_allocated()` is well below the card's size? (3) Which of the spike's parts
# grows with the square of the prompt, and which setting of notebook 04 removes it?
