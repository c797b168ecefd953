# %% [markdown]
# # 07 · Memory forensics: the weights are the floor, the prefill is the spike, the KV cache climbs slowly
#
# One FP16 caption, read with the tools PyTorch gives: the CUDA allocator's summary, a memory snapshot (every
# allocation with the line of code that made it), and a timeline of the call with its phases marked. On a CPU,
# the course's tensor accounting stands in for the allocator. Then what none of these tools can see.

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
# ## Step 1: load the model, measured
#
# The fixed quick start of notebook 02: FP16 at load. On a GPU the allocator sees every byte the load puts on the
# card; on a CPU the tensor accounting cannot see what safetensors reads from the file, so there only the weights
# resident after the load are exact.

# %%
import torch
from xcomp_lab.lessons.precision import measure_load
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step
from xcomp_lab.core.units import fmt_bytes

step = STEPS["fp16"]
print(step.describe())
(model, tokenizer), load = measure_load(lambda: load_for_step(step, params), params.device, label="load")
weights = load.after_bytes
budget = course_budget(params, model.config)
print(load)
print(budget.describe())

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
# Here the code is one measured caption (`run_caption`, with the step's settings and the budget), which also
# marks the phases on the timeline: `vision` when the vision tower starts, `prefill` at the decoder's first call
# (the whole prompt at once), `decode` at its second (one new token per call from there). On a CPU the accounting
# samples memory at every allocation (`sample_every=1`), so no spike falls between two samples.

# %%
from xcomp_lab.run.call import run_caption
from xcomp_lab.course.results import build_record

images = batch_of_images(params)
cuda = params.device == "cuda"
snapshot_path = params.results_path.parent / "07-memory-snapshot.pickle"
if cuda:
    torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")  # 1.
run = run_caption(model, tokenizer, images, device=params.device, max_new_tokens=params.max_new_tokens,  # 2.
                  grad=step.grad, use_autocast=step.use_autocast, budget=budget, image_size=params.image_size,
                  label="07-caption-timeline", sample_every=1)
if cuda:
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._dump_snapshot(str(snapshot_path))  # 3.
    torch.cuda.memory._record_memory_history(enabled=None)
record(params, build_record("07-caption-timeline", {**params.as_dict(), "step": step.name}, run.memory,
                            tokens_per_s=run.tokens_per_s, caption=run.captions[0] if run.ok else None,
                            extra={"prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens,
                                   "memory_history": cuda}))
print(f"caption: {run.captions[0]!r} | prompt {run.prompt_tokens} tokens, {run.new_tokens} new")

# %% [markdown]
# The record line splits the peak the usual way: the weights, the KV cache the call built, and everything
# else the call made at its highest point ("activations").
#
# ## Step 3: what the allocator says
#
# On a GPU, PyTorch's caching allocator keeps two figures. **Allocated** is the memory of live tensors.
# **Reserved** is what the allocator holds from the driver (`cudaMalloc`): allocated memory plus freed blocks it
# keeps to reuse, so that the next tensor needs no `cudaMalloc`. `nvidia-smi` shows reserved memory (plus the
# CUDA context), not allocated. `torch.cuda.memory_summary()` prints both, now and at their peak since the last
# reset (the measurement resets the peak when the call starts). On a CPU there is no caching allocator to ask:
# the course's tensor accounting counts every storage an operation returns and subtracts it when freed, which is
# "allocated" in the same sense; nothing on a CPU corresponds to reserved memory that PyTorch could report.

# %%
from xcomp_lab.lessons.forensics import trim_memory_summary

if cuda:
    print(trim_memory_summary(torch.cuda.memory_summary(params.device, abbreviated=True)))
    print(f"allocated now {fmt_bytes(torch.cuda.memory_allocated())} | reserved now "
          f"{fmt_bytes(torch.cuda.memory_reserved())} | during the call: allocated peak "
          f"{fmt_bytes(run.memory.peak_bytes)}, reserved peak {fmt_bytes(run.memory.reserved_peak_bytes)}")
else:
    m = run.memory
    print(f"CPU tensor accounting ({m.kind}) for the call:")
    print(f"  allocated at start {fmt_bytes(m.start_bytes)} (the model's parameters and buffers)")
    print(f"  allocated peak     {fmt_bytes(m.peak_bytes)}")
    print(f"  allocated at end   {fmt_bytes(m.end_bytes)}")
    print(f"  reserved           (none: the C allocator's free lists are invisible to PyTorch)")
    print(f"  timeline samples   {len(m.timeline)}")

# %% [markdown]
# Allocated memory returns to the weights when the call ends: the call's tensors are all freed. On a GPU,
# reserved memory stays at its peak until `torch.cuda.empty_cache()` (which the measurement calls between steps):
# that cache is why a process can look full in `nvidia-smi` while PyTorch has room.
#
# ## Step 4: the snapshot
#
# The snapshot holds every allocation of the recorded call with its stack. Dropped on
# [pytorch.org/memory_viz](https://pytorch.org/memory_viz), it draws each tensor as a band over time; read in
# Python, it ranks the allocations and names the line of code behind each. Snapshots exist on CUDA only; on a
# CPU the timeline of Step 5 and the OOM report of notebook 01 (which names the operation that failed) are what
# the accounting offers instead.

# %%
from xcomp_lab.lessons.forensics import largest_allocations

if cuda:
    print(f"snapshot saved to {snapshot_path} ({snapshot_path.stat().st_size / 2**20:.1f} MiB of pickle)")
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
# The timeline starts with the load (from nothing to the weights; the pause between the load and the call is
# left out), then the call's markers. On a CPU every allocation is a sample. On a GPU the measurement reads the
# allocator at each marker only, so the line steps from marker to marker and the spike shows in the peak figure
# of the allocator, not in the line.

# %%
from xcomp_lab.course.charts import timeline_chart
from xcomp_lab.lessons.forensics import timeline_with_load

timeline = timeline_with_load(load.seconds, weights, run.memory.timeline)
timeline_chart(timeline, budget_bytes=budget.limit_bytes,
               title=f"One FP16 caption ({params.scale}, {params.device}): load, then the call")

# %% [markdown]
# The weights are most of the line; what the call adds sits on top of them, well under the budget. The same
# call without the weights, from its start:

# %%
above = [(t, b - weights, label) for t, b, label in run.memory.timeline]
timeline_chart(above, title="The same call, memory above the weights")

# %% [markdown]
# ## Step 6: read it marker by marker
#
# For each marker: memory at the marker, the highest sample before the next marker, and the rise between them.

# %%
from xcomp_lab.lessons.forensics import format_phases, phase_floors, phases

rows = {p.label: p for p in phases(timeline)}
print(format_phases(list(rows.values()), fmt_bytes))
print(f"exact peak of the call {fmt_bytes(run.memory.peak_bytes)} | highest timeline sample "
      f"{fmt_bytes(max(b for _, b, _ in run.memory.timeline))}")

# %% [markdown]
# - **load**: from nothing to the weights, the floor.
# - **start** to **vision**: the image is read and normalised; the pixel tensor is small.
# - **vision**: the vision tower and the projector run and the prompt is embedded: its activations come and go,
#   and the prompt's embeddings stay.
# - **prefill**: the decoder runs over the whole prompt at once: the spike.
# - **decode**: one token per call; the KV cache grows by one position per step.
# - **end**: everything the call made is freed.
#
# What makes the prefill spike? Two suspects grow with the prompt: the logits for every position over the whole
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
from xcomp_lab.lessons.forensics import measure_prefill_parts
from xcomp_lab.lessons.sequence import eager_scores_bytes, kv_cache_formula, prefill_logits_bytes

cfg = model.config
B, T, new = len(images), run.prompt_tokens, run.new_tokens
prefill = rows["prefill"]
measured_spike = (run.memory.peak_bytes if cuda else prefill.highest_bytes) - prefill.at_start_bytes
parts = measure_prefill_parts(model, tokenizer, images, device=params.device, grad=step.grad,
                              use_autocast=step.use_autocast, image_size=params.image_size)
logits_both = prefill_logits_bytes(cfg, B, T) * 3 // 2  # FP16 logits and their FP32 copy, alive together
scores = eager_scores_bytes(cfg, B, T, "float16")
kv_prompt = kv_cache_formula(cfg, B, T, "float16")
largest = max(parts.attention_bytes, parts.logits_bytes)
print(f"prefill: {fmt_bytes(measured_spike)} above its marker at the highest")
print(f"  one layer's attention, run alone: adds {fmt_bytes(parts.attention_bytes)} | its scores, {B} x "
      f"{cfg.num_attention_heads} heads x {T} x {T} x 2 bytes: {fmt_bytes(scores)} (x{parts.attention_bytes / scores:.1f})")
print(f"  output head + FP32 upcast, run alone: adds {fmt_bytes(parts.logits_bytes)} | {B} x {T} x {cfg.vocab_size:,} "
      f"x (2 + 4) bytes: {fmt_bytes(logits_both)} (x{parts.logits_bytes / logits_both:.2f})")
print(f"  the larger, {'attention' if parts.attention_bytes >= parts.logits_bytes else 'logits'}, is "
      f"{largest / measured_spike:.0%} of the prefill's rise; the rest, {fmt_bytes(measured_spike - largest)}, is what "
      f"is alive at that moment: the prompt's KV cache ({fmt_bytes(kv_prompt)} once complete) and hidden states")

# %%
from xcomp_lab.course.exercises import check

answer_7_1 = check("7.1", my_logits_mib, measured=parts.logits_bytes, batch=B, tokens=T, vocab=cfg.vocab_size)

# %% [markdown]
# The two suspects never overlap: a layer's scores are freed before the next layer starts, and the logits come
# after the last layer. So the spike is the larger of the two on top of what is alive at that moment. The
# attention adds several times its FP16 scores: the masked copy, and for the FP32 softmax an FP32 copy of the
# input and the FP32 result (on a GPU the softmax reads FP16 directly, one copy fewer). The scores grow with the
# square of the prompt, the logits with the prompt times the vocabulary: which one wins depends on the scale
# (at full scale, 32 heads against a vocabulary of 92,544).
#
# The decode phase is the slow climb: each step appends one position of keys and values in every layer.

# %%
decode = rows["decode"]
per_token = kv_cache_formula(cfg, B, 1, "float16")
print(f"KV cache per token: 2 x {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} KV heads x "
      f"{cfg.head_dim} x 2 bytes x batch {B} = {fmt_bytes(per_token)}")
print(f"KV cache at the end of the call: measured {fmt_bytes(run.memory.kv_cache_bytes)} | formula for {T} + {new - 1} "
      f"tokens {fmt_bytes(kv_cache_formula(cfg, B, T + new - 1, 'float16'))}")
print(f"decode phase: {fmt_bytes(decode.at_start_bytes)} at its marker, highest {fmt_bytes(decode.highest_bytes)} "
      f"(rise {fmt_bytes(decode.highest_bytes - decode.at_start_bytes)}, each step's own temporaries)")
floors = phase_floors(timeline, "decode", new - 1)  # one slice per decode step
if floors is None:
    print("the decode phase holds no samples between its markers here (a GPU timeline reads the allocator at the "
          "markers only)")
else:
    print(f"lowest point of each decode step, above the weights: "
          + ", ".join(f"{(f - weights) / 1024:.0f}" for f in floors) + " KiB")
    print(f"the floor climbs {fmt_bytes(max(floors) - floors[0])} from the first step to its highest, "
          f"{new - 2} steps later | formula {new - 2} x {fmt_bytes(per_token)} = {fmt_bytes((new - 2) * per_token)} "
          f"(the last slice also holds the end of the call, when memory is freed)")
print(f"a 1024-token answer (chat()'s default max_new_tokens) would add {fmt_bytes(1024 * per_token)} of cache")

# %% [markdown]
# The cache the call built matches the formula for the prompt plus the tokens fed back (the last token is
# sampled but never fed). Between two steps only the model and the cache remain, so the lowest point of each
# step climbs by one token's keys and values, while each step's own temporaries (its logits, one layer's
# activations) come and go above it. Per token the climb is small next to the prefill's spike; long answers and
# batches are what make it count.

# %%
del model
from xcomp_lab.lessons.precision import free

free(params.device)

# %% [markdown]
# ## Step 7: what the tools cannot see
#
# - **Reserved but not allocated** (GPU): the cache of freed blocks, and fragmentation: a block split for a
#   small tensor cannot serve a large one. An OOM message says "reserved by PyTorch but unallocated"; the
#   allocated figure does not show it. `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` reduces it.
# - **Workspaces** (GPU): cuBLAS keeps a workspace per stream from its first matrix product on; it comes from
#   PyTorch's allocator but belongs to no tensor of the model, so it appears as allocated memory that no
#   variable holds.
# - **Outside PyTorch** (GPU): the CUDA context (the kernels of every library loaded, typically hundreds of MiB),
#   and anything a library allocates with `cudaMalloc` itself. `torch.cuda.mem_get_info()` sees the card's
#   total use; the allocator's figures do not include it.
# - **On a CPU**: scratch space a kernel allocates for itself instead of returning it as a tensor (matrix-product
#   packing buffers, bitsandbytes' dequantized weights in notebook 06), the C allocator's freed-but-kept memory,
#   and the Python interpreter and libraries: the process's resident memory (RSS) includes them, the tensor
#   accounting does not.
#
# This machine's figures (they vary from run to run):

# %% tags=["nbval-ignore-output"]
from xcomp_lab.lessons.forensics import process_resident_bytes

if cuda:
    free_bytes, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    print(f"during the call: reserved peak {fmt_bytes(run.memory.reserved_peak_bytes)} - allocated peak "
          f"{fmt_bytes(run.memory.peak_bytes)} = {fmt_bytes(run.memory.reserved_peak_bytes - run.memory.peak_bytes)} "
          f"held by the allocator for no tensor")
    print(f"allocated after the call, beyond the weights it started with: "
          f"{fmt_bytes(run.after_release_bytes - run.memory.start_bytes)} (held by no variable of ours)")
    print(f"the card now: {fmt_bytes(total - free_bytes)} in use by all processes, {fmt_bytes(reserved)} reserved by "
          f"PyTorch: {fmt_bytes(total - free_bytes - reserved)} outside PyTorch's allocator")
else:
    rss = process_resident_bytes()
    print(f"tensor accounting at the call's peak {fmt_bytes(run.memory.peak_bytes)} | process resident memory now "
          f"{fmt_bytes(rss) if rss is not None else 'unknown (no /proc)'}: the interpreter, the libraries and the C "
          f"allocator's own memory are in the second figure only")

# %% [markdown]
# ## What we learned

# %%
call_share = (run.memory.peak_bytes - weights) / run.memory.peak_bytes
print(f"- The weights ({fmt_bytes(weights)}) are {weights / run.memory.peak_bytes:.0%} of the call's peak "
      f"({fmt_bytes(run.memory.peak_bytes)}); the call itself adds {call_share:.0%}.")
print(f"- The prefill rises {fmt_bytes(measured_spike)} above its marker: one layer's eager attention adds "
      f"{fmt_bytes(parts.attention_bytes)} (x{parts.attention_bytes / scores:.1f} its FP16 scores), the output head's "
      f"logits {fmt_bytes(parts.logits_bytes)}; the larger sets the spike.")
print(f"- The KV cache climbs {fmt_bytes(per_token)} per token: {fmt_bytes(run.memory.kv_cache_bytes)} for this "
      f"{T + new - 1}-token call, {fmt_bytes(1024 * per_token)} more for a 1024-token answer.")

# %% [markdown]
# **Questions.** (1) Only the last position's logits pick the next token: how would you avoid computing the
# others, and what would it save at each scale? (2) Why can a process fail with "CUDA out
# of memory" while `torch.cuda.memory_allocated()` is well below the card's size? (3) Which of the spike's parts
# grows with the square of the prompt, and which setting of notebook 04 removes it?
