# %% [markdown]
# # 00 · Setup and tour: 8.67 billion parameters, and what they cost before the first token
#
# Before fixing an out-of-memory error, know what has to fit. This notebook checks the environment, takes the
# model apart, turns its parameter count into bytes (the rule of thumb *params x bytes per param*), compares that
# with the memory PyTorch really sees on the cards it could run on, and captions a first image.

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

# %% [markdown]
# The first cell checks the parameters (a typo fails here, with a message that says what is allowed) and prints
# what we run on. This notebook uses `image_size` for its caption and `budget_gb` to name the card the course
# emulates; the other parameters matter from notebook 01 on.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.course.notebook import start, sample_images

params = start(scale=scale, device=device, budget_gb=budget_gb, model_name_or_path=model_name_or_path,
               batch_size=batch_size, image_size=image_size, max_new_tokens=max_new_tokens,
               attn_implementation=attn_implementation, seed=seed, results_path=results_path)
print(params)

# %% [markdown]
# ## The parts of InternLM-XComposer2-VL
#
# The model is a CLIP ViT-L/14 vision tower (run at 490 px: 35 x 35 = 1225 image tokens), a two-layer projector
# into the language model's 4096-wide space, and an InternLM2-7B decoder whose every projection carries a
# *PLoRA* branch: a rank-256 low-rank update applied only at image-token positions. The full-scale replica is
# built here on PyTorch's `meta` device: shapes without storage, so counting its parameters costs nothing.

# %% [markdown]
# **Exercise 0.1: predict, then measure.** The title says 8.67 billion parameters. Before the next cell counts
# them, predict how much memory the full model takes in FP32, everything it keeps included, in GiB (1024^3
# bytes). Write the number into `my_fp32_footprint_gib` and run on: the cell after the count compares it with
# this run's total, and `answer_0_1.solution()` (in a new cell) then shows the worked reasoning.

# %%
my_fp32_footprint_gib = None  # your prediction, in GiB

# %% [markdown]
# First in plain PyTorch (every parameter's `numel()`, every buffer's bytes), then by part with the course's
# `weight_breakdown`, which reads the same tensors. With `model_name_or_path` pointing at a checkpoint of the
# original's own code, the full-size model is that code's, built from the checkpoint's files
# (`xcomp_lab.original.meta`); otherwise the course's replica.

# %%
import torch
from xcomp_lab.core.units import GIB, fmt_bytes
from xcomp_lab.course.charts import format_breakdown, weight_breakdown, weight_breakdown_chart

if params.original_code:
    from xcomp_lab.original.meta import original_on_meta

    full = original_on_meta(params.model_name_or_path, "full")
else:
    from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
    from xcomp_lab.model.scales import config_for_scale

    with torch.device("meta"):
        full = InternLMXComposer2ForCausalLM(config_for_scale("full"))
n_params = sum(p.numel() for p in full.parameters())
buffer_bytes = sum(b.numel() * b.element_size() for b in full.buffers())
print(f"parameters: {n_params:,} | buffers: {fmt_bytes(buffer_bytes)}\n")
full_rows = weight_breakdown(full)
print(format_breakdown(full_rows))

# %%
from xcomp_lab.course.exercises import check

answer_0_1 = check("0.1", my_fp32_footprint_gib, measured=sum(b for _, _, b in full_rows), n_params=n_params)

# %% [markdown]
# The last row is memory the parameter count misses: each decoder layer keeps its own rotary cos/sin tables for
# every position the model supports, as the original code does (the buffers counted above).
#
# ## The rule of thumb: parameters x bytes per parameter
#
# The course counts memory in GiB (1024^3 bytes) everywhere, the unit PyTorch prints.

# %%
bytes_per_param = {"FP32": 4, "FP16 / BF16": 2, "INT8": 1, "NF4": 0.5}
fp32_resident = sum(b for _, _, b in full_rows)
print(f"parameters: {n_params:,}")
for name, nbytes in bytes_per_param.items():
    print(f"{name:12s} {fmt_bytes(n_params * nbytes):>10}")
print(f"FP32 with the buffers (what loading it keeps): {fmt_bytes(fp32_resident)}")

# %% [markdown]
# ## What a card really holds
#
# A card sold as "48 GB" carries 48 GiB of memory chips, and PyTorch sees less: what the driver leaves after its
# own reservations and, on GDDR cards with ECC on, the ECC bits. `torch.cuda.get_device_properties(0).total_memory`
# reports it. Of that, the CUDA context and the libraries' kernels take some hundreds of MiB before the first tensor
# (`CONTEXT_BYTES`, measured by notebook 07 on an H100). `xcomp_lab.memory.cards` lists what PyTorch reports on
# common cards, each read from this project's GPUs or from a public out-of-memory message (the source is in
# `CARDS[name].source`). Against each, the full FP32 model:

# %%
from xcomp_lab.memory.cards import CARDS, CONTEXT_BYTES

print(f"CUDA context and kernels, outside PyTorch's allocator: {fmt_bytes(CONTEXT_BYTES)}\n")
print(f"{'card':<16}{'sold as':>8}{'PyTorch sees':>14}{'of its GiB':>11}{'usable':>11}   full FP32 model")
for card in CARDS.values():
    room = card.usable_bytes - fp32_resident
    verdict = f"fits, {fmt_bytes(room)} left" if room > 0 else f"short by {fmt_bytes(-room)}"
    print(f"{card.name:<16}{card.marketed_gb:>5} GB{fmt_bytes(card.total_bytes):>14}"
          f"{card.total_bytes / (card.marketed_gb * GIB):>11.1%}{fmt_bytes(card.usable_bytes):>11}   {verdict}")

# %% [markdown]
# The story's "48 GB GPU" is one of the 48 GB class. The report died with "44.16 GB" in use; PyTorch's messages
# print GiB, so the figure is read as 44.16 GiB. Which cards could it have been, and what does each allow?

# %%
from xcomp_lab.core.units import GB
from xcomp_lab.memory.budget import card_bytes
from xcomp_lab.memory.cards import cards_of_class

REPORT_IN_USE = round(44.16 * GIB)  # the original report, as PyTorch printed it
class_48 = cards_of_class(48)
for card in class_48:
    print(f"{card.describe()}; the report's {fmt_bytes(REPORT_IN_USE)} is {REPORT_IN_USE / card.total_bytes:.1%} "
          f"of what PyTorch sees; the FP32 model leaves {fmt_bytes(card.usable_bytes - fp32_resident)} of it")
largest = max(card.total_bytes for card in class_48)
print(f"48 x 10^9 bytes would be {fmt_bytes(48 * GB)}: "
      f"{'more' if 48 * GB > largest else 'no more'} than any 48 GB card shows PyTorch ({fmt_bytes(largest)})")
usable, course_card = card_bytes(params.budget_gb)
print(f"budget_gb={params.budget_gb:g}: the course emulates {course_card}")

# %% [markdown]
# The card in this machine, in plain PyTorch (CUDA only): `get_device_properties(0).total_memory` is the card's
# memory as PyTorch sees it, `torch.cuda.mem_get_info()` the free and total memory right now.

# %% tags=["nbval-ignore-output"]
from xcomp_lab.memory.cards import machine_card

if params.device == "cuda":
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"{props.name}: total_memory {fmt_bytes(props.total_memory)} | mem_get_info: {fmt_bytes(free)} free "
          f"of {fmt_bytes(total)}, {fmt_bytes(total - free)} in use (this process's CUDA context and any other "
          f"process) | PyTorch reserved {fmt_bytes(torch.cuda.memory_reserved())}")
    own = machine_card()
    print(f"as a card: {own.describe()}")
    same = [card for card in CARDS.values() if card.marketed_gb == own.marketed_gb]
    for card in same:
        print(f"the catalogue's {card.name}: {fmt_bytes(card.total_bytes)} ({card.source})")
else:
    print(f"device={params.device}: no GPU here, so no torch.cuda.mem_get_info(); the table above is what PyTorch "
          f"reports on each card")

# %% [markdown]
# Notebook 01 runs the official quick start under the budget of the course's card and reads what goes wrong.
#
# ## The model we run here
#
# At `scale="tiny"` the course runs a replica with every part of the real model, shrunk so it runs on a laptop
# CPU in seconds and trained to caption the course's synthetic scenes, whose true captions are known: a change
# of caption after FP16, INT8 or NF4 is a change you can check against the truth.
# At `scale="full"` the weights are random (the real ones cannot be shipped), and its captions are noise; with
# `model_name_or_path` it loads real weights the same way. A checkpoint of the original's own code (the download,
# or the course's random-weight build of it, `xcomp_lab.model.original`, "small" on a CPU: the real widths and 1225
# image tokens, one decoder layer) loads through that code, in its environment. Its own breakdown, loaded in FP32:

# %% [markdown]
# **Safety: what loading a model runs.** `trust_remote_code=True` executes the Python files shipped inside the
# checkpoint (`modeling_internlm_xcomposer2.py` here, the original's own code for real weights): read them
# first, and pin the exact version you read with `revision="<commit hash>"` when loading from a hub. Load weights
# from `safetensors` files, which hold only tensors; a pickled `.bin` checkpoint can run arbitrary code when
# unpickled, so if you must read one, use `torch.load(path, weights_only=True)`. The course's checkpoints are
# safetensors only.

# %%
from xcomp_lab.model.loading import load_model

model, tokenizer = load_model(params.model_name_or_path, scale=params.scale, dtype="float32",
                              device_map={"": params.device} if params.device == "cuda" else None)
rows = weight_breakdown(model)
print(format_breakdown(rows))
code_name = "original code" if params.original_code else "replica"
weight_breakdown_chart(rows, title=f"{params.scale} {code_name}, FP32: where the bytes are")

# %% [markdown]
# ## A first caption
#
# `model.chat` has the original's call shape: tokenizer, query with `<ImageHere>`, image, history. The replica's
# takes the image and the `image_size` parameter (None: the vision tower's own size); the original's takes a file
# or a preprocessed tensor and always resizes to 490 px. `chat_inputs` gives either its arguments. Each 14 x 14
# patch of the resized image becomes one image token.

# %%
from xcomp_lab.course.notebook import chat_inputs, image_grid

image, truth = sample_images(1)[0]
side, patch = image_grid(model, params)
with torch.inference_mode():
    response, history = model.chat(tokenizer, "<ImageHere>Describe the image in one sentence.",
                                   **chat_inputs(model, image, params))
random_weights = params.random_weights
print(f"image seen at {side} x {side} px: {(side // patch) ** 2} image tokens")
print(f"model: {response!r}\ntruth: {truth!r}" + ("  (random weights: the caption is noise)"
                                                   if random_weights else ""))
image.resize((side, side))

# %% [markdown]
# ## What we learned

# %%
loaded_params = sum(p for _, p, _ in rows)
rotary_share = dict((name, b) for name, _, b in full_rows)["rotary tables"] / fp32_resident
print(f"- The full model has {n_params / 1e9:.2f} B parameters: {fmt_bytes(n_params * 4)} in FP32, "
      f"{fmt_bytes(n_params * 2)} in FP16; with its buffers it keeps {fmt_bytes(fp32_resident)} in FP32.")
print(f"- Rotary tables the parameter count misses are {rotary_share:.1%} of the FP32 model's resident bytes.")
print(f"- The {params.scale} {code_name} loaded here has {loaded_params:,} parameters: "
      + ("the full model's count." if loaded_params == n_params else
         f"every part kept, {n_params / loaded_params:,.0f} times fewer than the full model."))
seen = sorted(card.total_bytes for card in class_48)
print(f"- PyTorch sees {fmt_bytes(seen[0])} to {fmt_bytes(seen[-1])} on the 48 GB class "
      f"({', '.join(card.name for card in class_48)}), {'less' if seen[-1] < 48 * GB else 'no less'} than "
      f"48 x 10^9 bytes ({fmt_bytes(48 * GB)}); the full FP32 model takes {fp32_resident / usable:.0%} of the "
      f"{fmt_bytes(usable)} the course's {params.budget_gb:g} GB card allows.")
print(f"- The first caption {'matches' if response == truth else 'differs from'} the truth"
      + (" (random weights: noise)." if random_weights else "."))

# %% [markdown]
# **Questions.** (1) Which part of the model would you quantize first to save the most memory? (2) Why does the
# rotary table cost the same at every batch size? (3) If params x bytes says FP32 fits a 48 GB card, what else
# must fit beside the weights during a caption? (4) Why can two cards sold with the same memory show PyTorch
# different totals?
