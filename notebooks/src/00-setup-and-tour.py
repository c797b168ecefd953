# %% [markdown]
# # 00 · Setup and tour: 8.67 billion parameters, and what they cost before the first token
#
# Before fixing an out-of-memory error, know what has to fit. This notebook checks the environment, takes the
# model apart, turns its parameter count into bytes (the rule of thumb *params x bytes per param*), and
# captions a first image.

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
# what we run on.

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
# built here on PyTorch's `meta` device: shapes without storage, so counting 8.67 B parameters costs nothing.

# %% [markdown]
# **Exercise 0.1: predict, then measure.** The title says 8.67 billion parameters. Before the next cell counts
# them, predict how much memory the full model takes in FP32, everything it keeps included, in GiB (1024^3
# bytes). Write the number into `my_fp32_footprint_gib` and run on: the cell after the count compares it with
# this run's total, and `answer_0_1.solution()` (in a new cell) then shows the worked reasoning.

# %%
my_fp32_footprint_gib = None  # your prediction, in GiB

# %%
import torch
from xcomp_lab.course.charts import format_breakdown, weight_breakdown, weight_breakdown_chart
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
from xcomp_lab.model.scales import config_for_scale

with torch.device("meta"):
    full = InternLMXComposer2ForCausalLM(config_for_scale("full"))
full_rows = weight_breakdown(full)
print(format_breakdown(full_rows))

# %%
from xcomp_lab.course.exercises import check

answer_0_1 = check("0.1", my_fp32_footprint_gib, measured=sum(b for _, _, b in full_rows),
                   n_params=sum(p for _, p, _ in full_rows))

# %% [markdown]
# The last row is memory the parameter count misses: each of the 32 decoder layers keeps its own rotary
# cos/sin tables for all 32,768 positions, as the original code does: 1 GiB in FP32.
#
# ## The rule of thumb: parameters x bytes per parameter
#
# A card sold as "48 GB" holds 48 x 10^9 bytes = 44.70 GiB. The course uses GiB (1024^3 bytes) everywhere.

# %%
from xcomp_lab.core.units import GB, GIB

n_params = sum(p for _, p, _ in full_rows)
bytes_per_param = {"FP32": 4, "FP16 / BF16": 2, "INT8": 1, "NF4": 0.5}
print(f"parameters: {n_params:,}")
for name, nbytes in bytes_per_param.items():
    print(f"{name:12s} {n_params * nbytes / GIB:6.2f} GiB  ({n_params * nbytes / GB:5.2f} GB)")
print(f"a {params.budget_gb:g} GB card allows {params.budget_gb * GB / GIB:.2f} GiB")

# %% [markdown]
# By this arithmetic the FP32 weights fit a 48 GB card with room to spare. Notebook 01 shows that the quick
# start still runs out of memory, and why.
#
# ## The model we run here
#
# At `scale="tiny"` the course runs a replica with every part of the real model, shrunk so it runs on a laptop
# CPU in seconds and trained to caption the course's synthetic scenes, whose true captions are known: a change
# of caption after FP16, INT8 or NF4 is a change you can check against the truth.
# At `scale="full"` the weights are random (the real ones cannot be shipped), and its captions are noise; with
# `model_name_or_path` it loads real weights the same way. Its own breakdown, loaded in FP32:

# %% [markdown]
# **Safety: what loading a model runs.** `trust_remote_code=True` executes the Python files shipped inside the
# checkpoint (`modeling_internlm_xcomposer2.py` here, the original's own code for real weights): read them
# first, and pin the exact version you read with `revision="<commit hash>"` when loading from a hub. Load weights
# from `safetensors` files, which hold only tensors; a pickled `.bin` checkpoint can run arbitrary code when
# unpickled, so if you must read one, use `torch.load(path, weights_only=True)`. The course's checkpoints are
# safetensors only.

# %%
from xcomp_lab.model.loading import load_model

model, tokenizer = load_model(params.model_name_or_path, scale=params.scale, dtype="float32")
rows = weight_breakdown(model)
print(format_breakdown(rows))
weight_breakdown_chart(rows, title=f"{params.scale} replica, FP32: where the bytes are")

# %% [markdown]
# ## A first caption
#
# `model.chat` has the original's call shape: tokenizer, query with `<ImageHere>`, image, history.

# %%
image, truth = sample_images(1)[0]
with torch.inference_mode():
    response, history = model.chat(tokenizer, "<ImageHere>Describe the image in one sentence.", image=image,
                                   max_new_tokens=params.max_new_tokens, do_sample=False, repetition_penalty=1.0)
print(f"model: {response!r}\ntruth: {truth!r}")
image.resize((112, 112))

# %% [markdown]
# ## What we learned

# %%
tiny_params = sum(p for _, p, _ in rows)
rotary_share = dict((name, b) for name, _, b in full_rows)["rotary tables"] / sum(b for _, _, b in full_rows)
print(f"- The full model has {n_params / 1e9:.2f} B parameters: {n_params * 4 / GIB:.2f} GiB in FP32, "
      f"{n_params * 2 / GIB:.2f} GiB in FP16.")
print(f"- Rotary tables the parameter count misses are {rotary_share:.1%} of the FP32 model's resident bytes.")
print(f"- The tiny replica keeps every part with {tiny_params:,} parameters.")

# %% [markdown]
# **Questions.** (1) Which part of the model would you quantize first to save the most memory? (2) Why does the
# rotary table cost the same at every batch size? (3) If params x bytes says FP32 fits 48 GB, what else must
# fit beside the weights during a caption?
