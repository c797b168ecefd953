"""The instructor guide, generated from the course's own measurements: `docs/instructor-guide.md`.

    python -m xcomp_lab.tools.guide                     # re-render the guide from the inputs committed in docs/
    python -m xcomp_lab.tools.guide --timings course-output/tiny-cpu/timings.json --note "..."
                                                  # first record a course run: timings, results, this machine
    python -m xcomp_lab.tools.guide --check             # exit 1 if the committed guide is not what its inputs give
    python -m xcomp_lab.tools.guide --kernel-memory     # first re-measure each notebook kernel's peak memory
    make guide NOTE="..."                         # run the course at tiny scale, record it and render

The text is the Jinja2 template `xcomp_lab/tools/templates/instructor-guide.md.j2` (package data): every heading,
sentence, command and table layout, and the formatting of each figure. This module reads the inputs, computes
every figure the text quotes and renders: the tiny-scale course run recorded in `docs/` (`timings-tiny-cpu.json`,
`results-tiny-cpu.jsonl`), the full-scale GPU run in `results/full-h100/` and, when present, the two-GPU split in
`results/full-h100x2/split.jsonl`, the peak memory of each notebook's kernel recorded in `docs/`
(`kernel-memory-tiny-cpu.json`, `measure_kernel_memory`) and the notebooks' sources (`notebooks/src/`,
whose questions the answer key answers); paths are found from `repository_root()` when a function runs.

The teaching material stays here as Python data rather than in the template or a data file: the learning goals
(`GOALS`), the workshop agendas in teaching minutes (`AGENDAS`, the one kind of number typed here: a plan, not a
measurement), how long to give an exercise (`EXERCISE_PLAN`), the answer key (`ANSWERS`) and the troubleshooting
entries (`TROUBLES`). Each is checked against the course when the guide renders: a notebook without goals or
without a slot in each agenda, an agenda whose minutes do not add up, a question a notebook asks that the key does
not answer, or an answer to a question no notebook asks, is refused. Answers and fixes are Jinja text rendered with
the same context as the template, so their figures are computed, never typed; tests read the data, and a typed
table needs no loader or schema of its own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.core.machine import describe_machine
from xcomp_lab.core.resources import package_file, repository_root
from xcomp_lab.core.units import GIB, fmt_bytes
from xcomp_lab.course.exercises import CLOSE, EXERCISES, WELL_DONE
from xcomp_lab.lessons.device_map import split_report
from xcomp_lab.lessons.sequence import eager_scores_bytes, image_tokens, logits_peak_bytes
from xcomp_lab.memory.budget import card_bytes
from xcomp_lab.memory.cards import CARDS, Card, card_for_gb, cards_of_class
from xcomp_lab.model.configuration_internlm_xcomposer2 import VIT_L14_490
from xcomp_lab.model.scales import config_for_scale

TEMPLATE = "instructor-guide.md.j2"
TIMINGS_NAME = "timings-tiny-cpu.json"
TINY_RESULTS_NAME = "results-tiny-cpu.jsonl"
KERNEL_MEMORY_NAME = "kernel-memory-tiny-cpu.json"  # in docs/, beside the other recorded runs (measure_kernel_memory)


@dataclass(frozen=True)
class GuidePaths:
    """Where the guide's inputs are read and the guide is written."""

    docs: Path
    guide: Path
    timings: Path
    tiny_results: Path
    full: Path
    edition: Path  # the notebooks executed at full scale on a GPU (`tools.course --edition`)
    split: Path
    sources: Path  # the notebooks' .py sources, whose questions the answer key answers
    kernel_memory: Path  # each notebook kernel's peak memory at tiny scale (measure_kernel_memory)


def guide_paths(root: Path | None = None) -> GuidePaths:
    """The guide's files in a checkout (default: `repository_root()`, looked up now)."""
    root = repository_root() if root is None else Path(root)
    docs = root / "docs"
    return GuidePaths(docs=docs, guide=docs / "instructor-guide.md", timings=docs / TIMINGS_NAME,
                      tiny_results=docs / TINY_RESULTS_NAME, full=root / "results" / "full-h100",
                      edition=root / "results" / "full-h200",
                      split=root / "results" / "full-h100x2" / "split.jsonl", sources=root / "notebooks" / "src",
                      kernel_memory=docs / KERNEL_MEMORY_NAME)


@dataclass(frozen=True)
class Goals:
    """What one notebook asks and what a learner should be able to do after it."""

    question: str
    goals: tuple[str, ...]


GOALS: dict[str, Goals] = {
    "00": Goals("What is in the model, and what does params x bytes predict?", (
        "Name the parts of InternLM-XComposer2-VL-7B (InternLM2 decoder with PLoRA, CLIP ViT-L/14 at 490 px, "
        "projector) and say which part holds most of the 8.67 B parameters.",
        "Predict the weights' memory from parameters x bytes per parameter, in GiB, and explain the extra "
        "memory the count misses (the per-layer rotary caches).",
        "Explain what `trust_remote_code=True` runs, why to pin a revision and why to load safetensors.",
        "Caption an image with `model.chat()` exactly as the model card does.",
    )),
    "01": Goals("Why does the FP32 quick start run out of memory on 48 GB?", (
        "Emulate the course's 48 GB card (an L40S, as PyTorch sees it) and reproduce a real `OutOfMemoryError`.",
        "Read the error field by field: what was allocated, reserved and free, what was asked for, and why "
        "attention is not the cause.",
        "Record a memory snapshot of the failing call and watch autocast's weight copies pile up layer by layer.",
        "Explain autocast's cache of FP16 weight copies under `no_grad`, and two fixes that keep FP32 "
        "(no autocast, or `inference_mode`).",
        "Recover from an OOM without restarting the kernel.",
    )),
    "02": Goals("`.half()` after loading, `dtype=` at load, or bfloat16?", (
        "Measure that 16 bits halve the weights, and that `.half()` after an FP32 load pays for the FP32 model first.",
        "Load with `dtype=` so the peak while loading stays at the 16-bit size.",
        "Compare FP16 and BF16 captions and logits against FP32 (drift, top-1 agreement) and their speed.",
    )),
    "03": Goals("What do `.eval()`, `no_grad` and `inference_mode` each save?", (
        "Separate what `.eval()` does (dropout off, reproducible answers) from what it does not (memory).",
        "Measure the memory a forgotten gradient mode costs in a scoring pass, and why a captioning call is "
        "protected by `generate()`'s own `no_grad`.",
        "Choose between `no_grad` and `inference_mode`.",
    )),
    "04": Goals("Eager vs sdpa, image size, batch and KV cache: where does the peak come from?", (
        "Count the tokens an image brings (1225 at 490 px) and relate the peak to prompt length and batch.",
        "Explain eager attention's batch x heads x T x T scores and when sdpa lowers the peak.",
        "Predict the KV cache from its formula and check it against measurement.",
        "Spot the FP32 logits of the whole prompt as part of the peak.",
    )),
    "05": Goals("`device_map=\"auto\"`, `max_memory` and CPU offload: what fits where, at what cost?", (
        "Plan the full model on the meta device: per-module sizes and how `device_map` fills cards layer by layer.",
        "Set `max_memory` for one or two cards and read the resulting map.",
        "Measure that offloading frees resident memory, keeps the caption and costs time on every token.",
    )),
    "06": Goals("bitsandbytes INT8 and NF4: what do they save and what do they cost?", (
        "Predict INT8 and NF4 footprints and explain what stays 16-bit (output head, embeddings, norms).",
        "Check that PLoRA still acts on image tokens after quantization.",
        "Weigh memory against speed (dequantization per matrix product) and caption quality.",
    )),
    "07": Goals("What do `memory_summary()`, snapshots and a timeline tell us?", (
        "Read `torch.cuda.memory_summary()`: allocated vs reserved, and what each line means.",
        "Record a memory snapshot and a timeline of one caption, and read it phase by phase "
        "(load, vision, prefill, decode).",
        "Name what the tools cannot see (reserved but unallocated, workspaces, memory outside PyTorch).",
    )),
    "08": Goals("All steps side by side, and a planner for your own card.", (
        "Compare every step of the course in one chart: memory, speed, quality.",
        "Use the planner (estimator on fake tensors) to decide whether a configuration fits a given card.",
        "Pick the cheapest change that fits a given card and defend the choice with the course's numbers.",
    )),
    "09": Goals("And my model? Plan any transformers LLM or VLM from its config, and check the plan.", (
        "Plan a published model by its preset name and your own by its `config.json` folder: read the phase table "
        "(load, vision, prefill, decode; allocated and reserved), the breakdown and the verdict for a named card.",
        "Check a plan yourself: the tiny model's real call under the CPU tensor accounting, or one real call on a "
        "GPU with `reset_peak_memory_stats()` and `max_memory_allocated()`/`max_memory_reserved()`.",
        "Ask the inverse questions (the largest batch, prompt and new tokens that fit; the cheapest recipe) and "
        "explain why the reserved peak, not the allocated one, decides what fits.",
        "Read the planner's measured error per architecture against a weights-only estimate "
        "(`accelerate estimate-memory`) and say what the weights-only figure leaves out.",
    )),
}


# ------------------------------------------------------------------------------------------- the workshop agenda

@dataclass(frozen=True)
class Slot:
    """One item of a workshop agenda, in teaching minutes: reading, running, discussing (a plan, not a measurement).

    `what` is a notebook's two-digit prefix, or the name of a break or an opening. `cut` says what to do when the
    room runs late and `cut_minutes` how many minutes the item keeps then (0: dropped); an essential item has no
    cut and keeps all its minutes.
    """

    what: str
    minutes: int
    plan: str
    cut: str = ""
    cut_minutes: int | None = None

    @property
    def essential(self) -> bool:
        return not self.cut

    @property
    def minutes_if_cut(self) -> int:
        return self.minutes if self.essential or self.cut_minutes is None else self.cut_minutes


@dataclass(frozen=True)
class Agenda:
    """A workshop of `minutes` teaching minutes: its items in order (their minutes add up to it)."""

    name: str
    minutes: int
    slots: tuple[Slot, ...]


# Teaching minutes are the one kind of number typed here: a plan for a room of learners, not a measurement. The
# machine's seconds for each notebook come from the recorded run and are set against them in the guide.
AGENDAS: tuple[Agenda, ...] = (
    Agenda("2-hour workshop", 120, (
        Slot("Opening", 5, "The story (a 48 GB card, FP32, CUDA out of memory in attention, 44.16 GB in use); everyone "
             "has `make lab` open on `notebooks/` from the setup the day before."),
        Slot("00", 10, "Run it top to bottom; Exercise 0.1 (FP32 footprint); read the card table: what PyTorch sees "
             "on a card is less than its marketed size.",
             "Run it as a demo and read only the card table and What we learned.", 5),
        Slot("01", 20, "The heart of the story: Exercise 1.1 before Step 5, the error read field by field (Step 4), "
             "the copies piling up (Step 6), the two fixes (Step 7)."),
        Slot("02", 15, "Exercise 2.1, then Step 6's side-by-side table; Step 5 (host RAM) read as a demo."),
        Slot("Break", 10, "Leave the kernels of 00-02 shut down (Kernel > Shut Down All Kernels) before the break."),
        Slot("03", 10, "Exercise 3.1; Step 3's line (eval saves no memory) against Step 4's (the gradient mode does).",
             "Demo only: show Step 3's and Step 4's lines, skip the exercises.", 5),
        Slot("04", 10, "Exercise 4.1 (batch) and Step 6's verdict on what sets the peak at each scale.",
             "Keep Exercise 4.1 and What we learned; Steps 5-7 as a demo.", 5),
        Slot("05", 5, "Demo only: Step 3's map (one 24 GB card and the CPU) and Step 5's cost in time.",
             "Drop it; point to its What we learned.", 0),
        Slot("06", 15, "Exercise 6.1, Step 5 (what stays 16-bit) and Step 10's table."),
        Slot("07", 5, "Demo only: the timeline chart (Step 5) and Step 6's two suspects.",
             "Drop it; notebook 08's estimator line carries its message.", 0),
        Slot("08", 10, "Exercise 8.1 with the planner; each learner picks a card of their own and predicts."),
        Slot("09", 5, "Demo only: plan one published model for a card in the room, then the H200 matrix chart.",
             "Drop it; point to `python -m xcomp_lab.plan` for the learners' own models.", 0),
    )),
    Agenda("3-hour workshop", 180, (
        Slot("Opening", 5, "The story and the promise: every number is measured on the learners' own machines."),
        Slot("00", 15, "Run it; Exercise 0.1; the card table and the safety notes (trust_remote_code, safetensors).",
             "Run it as a demo; keep Exercise 0.1.", 10),
        Slot("01", 25, "Exercise 1.1; Step 4 (the error, field by field) discussed in pairs; Step 6's trace chart."),
        Slot("02", 15, "Exercise 2.1; the three loads; Step 5's host RAM read against the machines in the room."),
        Slot("Break", 10, "Shut down the kernels of 00-02 before the break."),
        Slot("03", 15, "Exercises 3.1 and 3.2; Step 2 (dropout) as the reason for `.eval()`.",
             "Keep Exercise 3.1; Steps 5-6 as a demo.", 10),
        Slot("04", 15, "Exercises 4.1 and 4.2; Step 6's crossover: why the tiny and the full model disagree."),
        Slot("05", 15, "Exercise 5.1; the two-card map against the recorded two-GPU run; offloading's price in time.",
             "Demo only: Steps 2-3's maps and Step 5's price.", 5),
        Slot("Break", 10, "Shut down the kernels of 03-05 before the break."),
        Slot("06", 15, "Exercise 6.1; Step 6's PLoRA check; Step 10's table and the speed lines."),
        Slot("07", 10, "Exercise 7.1; the timeline and its phases.",
             "Demo only: the timeline chart and Step 6's suspects.", 5),
        Slot("08", 15, "Exercise 8.1; the planner on each learner's own card; the closing questions."),
        Slot("09", 15, "Each learner plans a model of their own (a preset or a config.json folder) for their card; "
             "the matrix chart: where the planner and accelerate's estimate part, and why.",
             "Demo only: one plan and the matrix chart.", 5),
    )),
)


@dataclass(frozen=True)
class ExercisePlan:
    """How long a room gets to guess before an exercise's measurement, and to discuss its answer (teaching minutes)."""

    guess_minutes: int
    discuss_minutes: int


EXERCISE_PLAN = ExercisePlan(guess_minutes=2, discuss_minutes=3)


# ---------------------------------------------------------------------------------------------- the answer key

@dataclass(frozen=True)
class Answer:
    """The short answer to one question a notebook asks, and where the learner's run shows it.

    `question` is the notebook's question as it reads (whitespace aside): a reworded question no longer matches,
    so its answer is checked again. `answer` and `where` are Jinja text rendered with the guide's context: a
    figure comes from the recorded runs (or the model's configuration) through a `{{ ... }}` expression, never
    typed (`tests/test_guide.py` scans them).
    """

    question: str
    answer: str
    where: str


ANSWERS: dict[str, tuple[Answer, ...]] = {
    "00": (
        Answer("Which part of the model would you quantize first to save the most memory?",
               "The decoder's linear layers (`wqkv`, `wo`, `w1`, `w3`, `w2` of every layer): they hold most of the "
               "parameters, every other part a few percent. They are exactly what bitsandbytes quantizes (every "
               "`nn.Linear`, notebook 06).",
               "The full model's breakdown (the cell after Exercise 0.1), `share` column: the \"decoder (without "
               "PLoRA)\" row."),
        Answer("Why does the rotary table cost the same at every batch size?",
               "It is a buffer each decoder layer builds once, at load, for every position the model supports: it "
               "depends on positions, not on the inputs, so every image of a batch reuses it. A batch multiplies "
               "what the call makes (activations, KV cache: notebook 04, Step 2). It grows only when a prompt "
               "passes the supported positions (notebook 04, Step 4's last line).",
               "The breakdown's \"rotary tables\" row (no parameters, a fixed size) and What we learned, second line."),
        Answer("If params x bytes says FP32 fits a 48 GB card, what else must fit beside the weights during a "
               "caption?",
               "The rotary tables (buffers the parameter count misses), the prefill's activations (hidden states, "
               "then one layer's attention scores or the whole prompt's logits, whichever is larger: notebook 04), "
               "the KV cache, autocast's FP16 weight copies when autocast runs under `no_grad` (notebook 01), "
               "cuBLAS's workspace, and outside PyTorch's allocator the CUDA context. On the {{ full.gpu }} the "
               "FP32 weights took {{ key.fp32_weights | bytes }}, the FP32 caption without autocast peaked at "
               "{{ key.fp32_peak | bytes }}, and the quick start died with {{ quick_start.allocated }} allocated.",
               "What we learned, fourth line (the FP32 model's share of the course's card); notebook 01 measures "
               "the rest."),
        Answer("Why can two cards sold with the same memory show PyTorch different totals?",
               "The marketed size counts the memory chips; PyTorch reports what the driver leaves "
               "(`get_device_properties().total_memory`): less the driver's own reservations and, on GDDR cards "
               "with ECC on, the ECC bits, which differ by model, driver and setting. The course's catalogue of "
               "{{ key.class24.gb }} GB cards runs from {{ key.class24.low.total_bytes | bytes }} "
               "({{ key.class24.low.name }}) to {{ key.class24.high.total_bytes | bytes }} "
               "({{ key.class24.high.name }}).",
               "The card table's \"PyTorch sees\" and \"of its GiB\" columns."),
    ),
    "01": (
        Answer("Why does autocast keep the copies under `no_grad` but not under `inference_mode`?",
               "Autocast caches the FP16 copy of a weight only while that weight requires grad, so that a backward "
               "pass could reuse it; `no_grad` leaves a parameter's `requires_grad` as it is, so the cache fills "
               "layer by layer until the autocast block ends. Inside `inference_mode` autocast keeps no copies "
               "from torch 2.10 on (PyTorch PR #165068); `torch.autocast(..., cache_enabled=False)` keeps none on "
               "any version (notebook 03, Step 5). On the {{ full.gpu }} the quick start held "
               "{{ quick_start.autocast_cache | bytes }} more than the whole call without autocast needs when it "
               "died.",
               "Step 5's lines: the two peaks without a budget, their difference against the FP16 copies."),
        Answer("On which card of notebook 00's table would the quick start have fitted, and with how much to spare?",
               "Without a budget it needs the FP32 weights plus nearly all the FP16 copies: the estimator predicts "
               "{{ key.quick_need | bytes }} at full scale (`results/full-h100/predictions.json`). Of the catalogue, "
               "{% for card in key.quick_fits %}{{ card.name }} ({{ card.spare | bytes }} to spare)"
               "{{ ', ' if not loop.last else '' }}{% else %}no card{% endfor %} would hold it; the course's "
               "{{ quick_start.card_gb | fmt('g') }} GB card ({{ key.story_card.name }}) falls "
               "{{ key.story_card.short | bytes }} short.",
               "Step 5's first line (the quick start's peak without a budget) against notebook 00's \"usable\" "
               "column."),
        Answer("Would `.half()` alone have avoided the OOM, and what would it cost? (Notebook 02 measures it.)",
               "{{ 'Yes' if key.half_peak < quick_start.budget else 'No' }}: with 16-bit weights autocast has nothing "
               "to copy and the weights halve; the full-scale `.half()` caption peaked at {{ key.half_peak | bytes }} "
               "against the {{ quick_start.budget | bytes }} budget. The cost is the load: `.half()` converts a "
               "model that already exists in FP32, so {{ key.fp32_weights | bytes }} must fit first, on the card "
               "(`.cuda().half()`) or in host RAM (`.half().cuda()`), plus a small drift of the logits. Loading "
               "with `dtype=torch.float16` avoids the FP32 copy.",
               "Notebook 02: Step 2's load line and Step 6's table."),
        Answer("Which field of the CUDA message would tell you that fragmentation, not live tensors, filled the card?",
               "\"reserved by PyTorch but unallocated\": memory the caching allocator holds in freed blocks that no "
               "tensor uses. Large against the request that failed, it means the free blocks were too scattered to "
               "serve it (the message then suggests `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`); \"allocated "
               "by PyTorch\" is the live tensors. In the full-scale quick start it read "
               "{{ key.unallocated | bytes }} against a {{ quick_start.asked }} request, with "
               "{{ quick_start.allocated }} allocated: "
               "{% if key.unallocated > key.asked %}the scattered blocks summed to more than the request and none "
               "could hold it, so fragmentation chose the allocation that failed, while the live copies made a "
               "failure certain{% else %}too little to serve the request, so live tensors filled the card"
               "{% endif %}.",
               "Step 4's field table (on a GPU: the CUDA form of the message)."),
    ),
    "02": (
        Answer("On a 24 GB card, which of the three paths can load the full model at all, and why does the order "
               "`.half().cuda()` change the answer?",
               "The loads that ask for a 16-bit dtype (`dtype=torch.float16` or `torch.bfloat16`): they keep "
               "{{ key.fp16_weights | bytes }} of weights, {{ 'within' if key.fp16_weights < key.card24.usable_bytes "
               "else 'beyond' }} the {{ key.card24.usable_bytes | bytes }} the course's {{ key.card24.gb }} GB card "
               "({{ key.card24.name }}) allows. `.cuda().half()` puts the FP32 model ({{ key.fp32_weights | bytes }}) "
               "on the card first, {{ 'more' if key.fp32_weights > key.card24.usable_bytes else 'no more' }} than "
               "it holds. `.half().cuda()` converts in host RAM, so the card only ever holds 16-bit weights: the "
               "price moves to host RAM, which must hold the FP32 model while it converts (Step 5).",
               "Step 1's prediction line for the 16-bit weights and Step 6's load peaks; notebook 00's card table."),
        Answer("BF16 rounds each weight more coarsely than FP16; why is it still the usual choice for training?",
               "BF16 keeps FP32's exponent width, so it covers FP32's range: gradients and activations neither "
               "overflow (FP16 stops at {{ key.fp16_max | fmt(',.0f') }}) nor underflow to zero, and training needs "
               "no loss scaling; the shorter mantissa is rounding noise that gradient descent absorbs. In the "
               "recorded tiny run BF16's largest logit difference from FP32 was {{ key.bf16_diff | fmt('.3g') }} "
               "against FP16's {{ key.fp16_diff | fmt('.3g') }}.",
               "Step 6's table, `max|diff|` column."),
        Answer("When the logits move, which positions of a caption would you expect to flip first?",
               "Those where the two best tokens score closest (a small margin between the top two logits): the words "
               "the image decides, a colour, a size, a relation, rather than fixed words such as \"a\" or \"of\". "
               "Greedy decoding feeds each token back, so after the first flip every later token may change.",
               "The drift lines of Steps 2-4 (top-1 agreement, same caption as FP32) and Step 6's table."),
        Answer("If a load in the checkpoint's own dtype keeps its weights as the checkpoint's mapped pages, what "
               "happens to them when the machine runs short of RAM, and what would happen to the FP32 path's copy "
               "instead?",
               "Mapped pages are clean copies of the file: under pressure the kernel drops them and reads them again "
               "from the checkpoint when they are next touched (slower, never lost). The FP32 path's copy is the "
               "process's own (anonymous) memory: without swap it cannot be dropped, so the kernel's out-of-memory "
               "killer ends the process (a dead Jupyter kernel); with swap it is written out and read back, slowly.",
               "Step 5's `anonymous` column and the lines under its chart that compare the loads' own memory."),
    ),
    "03": (
        Answer("A model with batch normalization instead of dropout: what would `.eval()` change there?",
               "BatchNorm normalises with the current batch's mean and variance in training mode and updates its "
               "running statistics on every forward pass; in eval mode it uses the stored running statistics. "
               "`.eval()` would change the outputs (and make an image's result independent of its batch), not the "
               "memory. This model has none: its RMSNorm and LayerNorm compute the same in both modes, and dropout "
               "is the only module that reads the flag.",
               "Step 2's first line (the dropout layers, the only mode-dependent modules here)."),
        Answer("If the prompt's graph stays alive during the whole of `generate`, why, and what single line inside "
               "the captioning code would free it without any gradient mode?",
               "The prompt embeddings passed to `generate` were made by the vision tower and the projector with "
               "gradients on: they carry a `grad_fn` holding the graph's saved activations, and `generate` keeps "
               "them until it returns. `embeds = embeds.detach()` before the call drops the graph. On the "
               "{{ full.gpu }} that graph cost the FP32 caption {{ eval_mode.caption_graph | bytes }}.",
               "Step 6's last two lines: the graph of vision + projector + splice, and the call's extra peak "
               "against it."),
        Answer("Notebook 02 compared logits of several models: which gradient mode should such a comparison run in, "
               "and what would it cost at full scale without one?",
               "`inference_mode` (or `no_grad`): a comparison never calls backward. Without one, every layer's "
               "saved activations live as long as the logits. In the recorded tiny run the scoring pass with "
               "gradients enabled {% if key.grad_oom %}ran out of the budget and needed "
               "{{ key.grad_need | bytes }} without one{% else %}peaked at {{ key.grad_need | bytes }}{% endif %}, "
               "x{{ key.grad_ratio | fmt('.1f') }} the pass under `no_grad`. The course recorded no full-scale "
               "scoring pass: the learner's full-scale run prints it in Step 4, and Exercise 3.1's line gives the "
               "ratio.",
               "Step 4's lines (fits or OOM, peak, held by the output) and Exercise 3.1's answer."),
    ),
    "04": (
        Answer("At what prompt length would one layer's FP32 softmax of the full model (32 heads) reach 1 GiB, and "
               "which image size (with the original's code: how many images) gives that many tokens?",
               "One layer's FP32 softmax is heads x T x T x {{ key.fp32_bytes }} bytes: with {{ key.heads }} heads "
               "it reaches a GiB at T = {{ key.softmax.tokens }} tokens. Beside the caption prompt's "
               "{{ key.softmax.text_tokens }} text tokens that takes {{ key.softmax.image_tokens }} image tokens or "
               "more: a {{ key.softmax.side }} px image ({{ key.softmax.patches }} x {{ key.softmax.patches }} patches of {{ key.patch }} px, "
               "{{ key.softmax.patches ** 2 }} tokens). The original's code resizes every image to its "
               "{{ key.softmax.original_side }} px ({{ key.softmax.per_image }} tokens an image), so there it takes "
               "{{ key.softmax.images }} images in one prompt.",
               "Step 3's token table and Step 1's scores line, with the full configuration's sizes."),
        Answer("Why does grouped-query attention shrink the KV cache but not the eager scores?",
               "The cache stores keys and values per KV head, and {{ key.heads }} query heads share {{ key.kv_heads }} "
               "KV heads: the cache is {{ key.heads // key.kv_heads }} times smaller than with one KV head per "
               "query head. The scores are computed per query head (each its own queries against the shared keys), "
               "so they keep all {{ key.heads }} heads.",
               "Step 7's formula and its predicted/measured lines; Step 1's scores line."),
        Answer("If the forward computed the logits of the last position only, where would the full model's peak "
               "move, and would sdpa then lower it?",
               "At full scale the prompt's logits (the head's FP16 output and its FP32 upcast, "
               "{{ key.logits.full | bytes }} at {{ key.full_tokens }} tokens) set the peak, which is why eager and "
               "sdpa peaked alike on the {{ full.gpu }} ({{ sdpa.eager_peak | bytes }} and "
               "{{ sdpa.sdpa_peak | bytes }}). With the last position only ({{ key.logits.last | bytes }}), the peak "
               "would move to one layer's eager attention, a few times its FP16 scores "
               "({{ key.full_scores | bytes }}; Step 6 measures the multiple), and sdpa, which never stores the "
               "scores, would then lower it.",
               "Step 6's T* lines (which term outweighs at each scale) and What we learned, second line."),
        Answer("Which would you change first for a 2-image prompt on a tight card: attention kind, batch or image "
               "size, and by how much would each lower the peak?",
               "It depends on the term that sets the peak, which Step 6 names for each scale. In the recorded tiny "
               "run a second image added {{ key.lever.batch | bytes }}; {{ key.lever.big_px }} px instead of "
               "{{ key.lever.mid_px }} px added {{ key.lever.size | bytes }} to the eager peak, and sdpa at "
               "{{ key.lever.big_px }} px saved {{ key.lever.sdpa | bytes }} of it. At full scale sdpa saved "
               "{{ (sdpa.eager_peak - sdpa.sdpa_peak) | bytes }}: there the levers are the image size (tokens fall "
               "with the square of the side) and captioning the images one at a time.",
               "Step 2's batch lines, Step 4's size lines and Step 5's gaps."),
    ),
    "05": (
        Answer("Why does `infer_auto_device_map` keep room on GPU 0 for the largest module when it offloads?",
               "Offloaded modules still run on GPU 0: a hook copies each one's weights there just before it runs "
               "(its `execution_device`) and drops them after. GPU 0 needs room for the largest of them beside what "
               "it keeps, or that module cannot run.",
               "Step 3's line \"room kept for it\" and Step 5's hook line (\"runs on\")."),
        Answer("How much `max_memory` would you give a 24 GB card so that the activations of notebook 04 still fit "
               "beside the weights?",
               "What the card allows less what a caption makes on top of the weights, at the largest prompt and "
               "batch you will run. On the {{ full.gpu }} one FP16 caption of a {{ sdpa.image_px }} px image made "
               "{{ key.fp16_call | bytes }} above its weights, an FP32 one {{ key.fp32_call | bytes }}; the course's "
               "{{ key.card24.gb }} GB card ({{ key.card24.name }}) allows {{ key.card24.usable_bytes | bytes }}, so "
               "for FP16 at most {{ (key.card24.usable_bytes - key.fp16_call) | bytes }}, less again for the longer "
               "prompts and larger batches of notebook 04. Write it in GiB: accelerate reads a \"GB\" figure as "
               "10^9 bytes.",
               "Step 2's note on what the plan does not count; notebook 04's activation lines."),
        Answer("The vision tower runs once per caption, the output head once per token: which is the cheaper to "
               "offload, and why does `device_map=\"auto\"` offload both?",
               "The vision tower: offloaded, it is brought in once per caption, the head at every generated token. "
               "`device_map=\"auto\"` knows only sizes, not how often a module runs: it fills the devices in the "
               "order the model registers its modules, and here the decoder comes first, then the head, the vision "
               "tower and the projector, so whatever does not fit after the decoder layers goes, both included.",
               "Step 3's map: its last entries and the offloaded parts."),
    ),
    "06": (
        Answer("Why does NF4 not reach a quarter of FP16's weights, and which part would you have to quantize to get "
               "closer?",
               "bitsandbytes quantizes only `nn.Linear` layers (the output head left out) and stores statistics "
               "beside them; the embeddings, the output head, the norms, the patch convolution and the rotary "
               "tables keep their 16 bits. On the {{ full.gpu }} NF4 kept {{ key.nf4_share | fmt('.0%') }} of "
               "FP16's weights ({{ quantized.nf4_weights | bytes }} of {{ quantized.fp16_weights | bytes }}). The "
               "largest 16-bit parts left are the output head and the token embeddings: quantizing the head (a "
               "linear) comes closer; the embeddings are a lookup bitsandbytes does not convert.",
               "Step 8's line on embeddings, output head and rotary tables, and its chart."),
        Answer("The output head is left in 16 bits by default: what would you expect to happen to the logits if it "
               "were quantized too?",
               "Every vocabulary score would carry the head's quantization error, with no later layer to average it "
               "out: where the two best tokens are close the pick flips, so captions drift more. transformers keeps "
               "the head out \"for numerical stability\". It would save memory: the head is as large as the token "
               "embeddings.",
               "Step 5's skip list and the head's row of the module table."),
        Answer("LLM.int8() couples the rows it multiplies at once: would two captions of the same image, one alone "
               "and one in a batch of four different images, be sure to agree in INT8? in NF4?",
               "INT8: no. LLM.int8() picks its outlier columns over all the rows it multiplies at once, so the other "
               "images decide which of this image's columns go through the 16-bit product, and its caption can "
               "change. NF4: no such coupling (16-bit activations, row by row), but as in FP16 a batch can take "
               "other kernels and summation orders, so bit-identical results are not guaranteed either.",
               "Step 6's outlier-column lines (over all rows against the text rows) and its verdict; Step 9's "
               "check on NF4."),
        Answer("On a GPU with room for the FP16 model, when is NF4 still worth its drift?",
               "When the freed memory buys something: a larger batch, longer prompts or answers (KV cache), another "
               "model on the same card, a cheaper card for serving; or where its kernel decodes faster than FP16. "
               "The recorded single runs on the {{ full.gpu }}: {% for run in quantized.speeds %}{{ run.label }} "
               "{{ run.tokens_per_s | fmt('.1f') }} tokens/s{{ ', ' if not loop.last else '' }}{% endfor %} (no "
               "warm-up, rough). Otherwise FP16.",
               "Step 9's speed line and Step 10's table."),
    ),
    "07": (
        Answer("Only the last position's logits pick the next token: how would you avoid computing the others, and "
               "what would it save at each scale?",
               "Slice the last hidden state before the head (`hidden_states[:, -1:, :]`; transformers' own models "
               "take `logits_to_keep=1`), so the head scores one position. It saves the whole prompt's logits and "
               "their FP32 upcast but one position's: {{ key.logits.tiny_saving | bytes }} at tiny scale "
               "({{ key.tiny_tokens }} prompt tokens), {{ key.logits.full_saving | bytes }} at full scale "
               "({{ key.full_tokens }} tokens), by the formula of Exercise 7.1.",
               "Step 6's line for the output head + FP32 upcast, and `answer_7_1.solution()`."),
        Answer("Why can a process fail with \"CUDA out of memory\" while `torch.cuda.memory_allocated()` is well "
               "below the card's size?",
               "`memory_allocated()` counts live tensors only. The allocator also holds freed blocks for reuse "
               "(reserved but unallocated, fragmented blocks that cannot serve a large request), the CUDA context and "
               "libraries take memory outside PyTorch, other processes share the card, and a per-process limit "
               "(`set_per_process_memory_fraction`, as the course sets) stops the allocator before the card is full.",
               "Step 7's list and, on a GPU, its lines (held for no tensor, outside the allocator)."),
        Answer("Which of the spike's parts grows with the square of the prompt, and which setting of notebook 04 "
               "removes it?",
               "Eager attention's scores, batch x heads x T x T per layer (with their FP32 softmax copy); the logits "
               "and the KV cache grow with T only. `attn_implementation=\"sdpa\"` (notebook 04, Step 5) never "
               "stores them.",
               "Step 6's two suspect lines (the scores formula) and notebook 04's Step 5."),
    ),
    "08": (
        Answer("Which single change saves the most memory for the least quality, and can the full-scale edition "
               "answer the quality half?",
               "In the recorded tiny run `{{ key.best.step }}` had the lowest peak, {{ key.best.peak | bytes }} "
               "({{ key.best.share | fmt('.0%') }} of the FP32 caption's), at {{ key.best.exact | fmt('.0%') }} exact "
               "match on the {{ key.best.n }} scenes it was scored on (FP32: {{ key.best.fp32_exact | fmt('.0%') }} of "
               "{{ key.best.fp32_n }}). "
               "The full-scale edition answers only the memory half: its weights are random, so it shows no quality.",
               "Step 2's table (peak, share of FP32's, exact match) and the quality chart."),
        Answer("On each 24 GB card of the planner's list, what is the largest batch of 490 px images the planner says "
               "FP16 can caption, and why can cards sold with the same size disagree?",
               "The learner's planner answers it: pick each {{ key.card24.gb }} GB card, set the image to "
               "{{ sdpa.image_px }} px and raise the batch until the verdict reads \"does not fit\" (or "
               "`largest_batch(dataclasses.replace(params, image_size={{ sdpa.image_px }}), card=...)`). They "
               "disagree because PyTorch sees different totals on them: {{ key.class24.low.name }} allows "
               "{{ key.class24.low.usable_bytes | bytes }}, {{ key.class24.high.name }} "
               "{{ key.class24.high.usable_bytes | bytes }}; the difference divided by one image's cost is how many "
               "more images the roomier card takes.",
               "The planner (Step 4) and the spare line above it."),
        Answer("Where would the estimator be wrong on a real GPU (think of what the allocator keeps that tensors do "
               "not)?",
               "Where memory is not a tensor: the CUDA context and the libraries' kernels outside the allocator (the "
               "planner subtracts a context measured on one machine, not this one's), cuBLAS workspaces (allocated, "
               "in no tensor), the allocator's rounding and fragmentation (reserved but unallocated), bitsandbytes' "
               "scratch inside its kernels, and whatever depends on the data (where a caption stops, LLM.int8()'s "
               "outlier columns). On the {{ full.gpu }} it stayed within {{ estimator.worst_error | fmt('.1%') }} of "
               "every step that fitted.",
               "Step 1's measured/predicted lines and What we learned."),
    ),
    "09": (
        Answer("Step 1's table splits the peak into weights, KV cache and activations: which part would you shrink "
               "first for a longer prompt, and which for a larger batch?",
               "Both grow the KV cache (layers x KV heads x head size x tokens x batch, keys and values) and the "
               "activations and logits of the prefill, never the weights. For a longer prompt: the prefill's "
               "activations first (sdpa instead of eager removes the batch x heads x T x T scores; a model that "
               "computes logits for the last position only saves the prompt-long logits), then the KV cache (a "
               "model with a sliding window caps it). For a larger batch: the KV cache grows with every prompt, so "
               "the room comes from quantizing the weights (INT8, NF4: Step 6's widget shows how much they free) and "
               "from shorter prompts. At full size the weights are most of the peak, so quantization frees the most.",
               "Step 1's breakdown lines and the widget (Step 6) with batch or prompt tokens raised."),
        Answer("Why does the search cut the batch where the reserved peak crosses the card's line rather than the "
               "allocated one?",
               "An allocation fails when the caching allocator has no free block large enough in the segments it "
               "already holds and the card cannot give it a new segment: what the card has given away is the "
               "reserved memory, not the allocated. Reserved is above allocated by the allocator's rounding (every "
               "block rounded up, whole segments taken from the card: small ones for small requests, larger ones "
               "for large requests) and by freed blocks it keeps cached and fragmented. A plan that fits on allocated alone can "
               "still run out of memory.",
               "Step 4's lines (allocated and reserved per batch) and its chart, where reserved climbs in steps."),
        Answer("accelerate's `estimate-memory` counts the weights only: on which calls of the matrix is it furthest "
               "from the measured peak, and what does the planner count that it does not?",
               "Where the weights are the smallest share of the peak: quantized (NF4, INT8) builds with the larger "
               "batch, the longer prompts and eager attention (its scores grow with the square of the prompt), and "
               "the VLMs whose images bring thousands of tokens (Idefics3 splits an image into tiles); the worst "
               "accelerate column of Step 5's table says how far, per architecture. The planner counts what the call adds: the KV cache, the activations and logits of "
               "the prefill and of each decode step, the vision encoder's, the inputs, bitsandbytes' statistics, "
               "cuBLAS's workspace, the allocator's rounding and segments (reserved), and a quantized load's "
               "staging copy.",
               "Step 5's table (accelerate's median and worst columns) and its reading line, and the grey crosses "
               "of its chart."),
    ),
}


# --------------------------------------------------------------------------------------------- troubleshooting

@dataclass(frozen=True)
class Trouble:
    """A failure a room of laptops meets: what the learner sees, the exact message, where it comes from, the fix.

    `message` is quoted as the code prints it, `…` standing for what differs by machine (a path, a size);
    `tests/test_guide.py` checks each quote against its source. `fix` is Jinja text rendered with the guide's
    context.
    """

    key: str
    symptom: str
    message: str
    source: str
    fix: str


TROUBLES: tuple[Trouble, ...] = (
    Trouble("make-missing", "`make course` or `make lab` fails before anything runs.",
            "bash: make: command not found", "the shell (zsh says `zsh: command not found: make`)",
            "Install make: `sudo apt-get install make` (Debian, Ubuntu), `sudo dnf install make` (Fedora), "
            "`xcode-select --install` (macOS); on Windows work inside WSL. Or run the Makefile's steps by hand: "
            "`python3.11 -m venv .venv`, `.venv/bin/python -m pip install --upgrade pip`, "
            "`.venv/bin/python -m pip install -r requirements.txt`, "
            "`.venv/bin/python -m pip install --no-deps --no-build-isolation -e .`, then "
            "`HF_HUB_OFFLINE=1 .venv/bin/python -m jupyter lab notebooks`."),
    Trouble("python-version", "`make` stops while installing the requirements.",
            "ERROR: No matching distribution found for transformers==5.24.0", "pip, on Python 3.10 (checked)",
            "The `python3` that made `.venv` is older than 3.11: pip first says \"Ignored the following versions that "
            "require a different python version: … 5.24.0 Requires-Python >=3.11.0\". Install Python 3.11 "
            "(python.org, `apt-get install python3.11 python3.11-venv`, `brew install python@3.11`, "
            "`pyenv install 3.11`), delete the half-made environment (`rm -rf .venv`: `make` reuses an existing one) "
            "and run `make course PYTHON=python3.11`. Python 3.12 and 3.13 resolve the same pins (pip's "
            "`--dry-run`), but the course's figures were recorded on 3.11."),
    Trouble("no-space", "Installing the requirements stops part way.",
            "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "pip",
            "The recorded environment (a CPU build of torch) takes {{ kernel_memory.environment_bytes | bytes }}, "
            "plus pip's download cache and its unpacking in `$TMPDIR`. On Linux, PyPI's `torch==2.13.0` brings "
            "NVIDIA's CUDA libraries as well (the `nvidia-*`, `cuda-toolkit` and `triton` packages, whatever the "
            "machine holds; checked with pip's `--dry-run --report`): on a laptop without an NVIDIA GPU install the "
            "CPU build first, `python3.11 -m venv .venv && .venv/bin/python -m pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cpu`, then `make course` keeps it (the pin is met). Free "
            "space, or point the big parts elsewhere: `make course VENV=/bigger/disk/xcomp-venv`, `TMPDIR=/bigger/"
            "disk/tmp`, `PIP_NO_CACHE_DIR=1`."),
    Trouble("small-gpu", "On a laptop with a small NVIDIA GPU, notebook 01 onwards fails in the budget cell.",
            "ValueError: a 48 GB card (43.74 GiB usable) is larger than cuda:0's …: choose a smaller budget_gb, at "
            "most the card you have", "xcomp_lab.memory.budget",
            "`device=\"auto\"` picks the GPU, and on a GPU the course emulates the real card, which needs a GPU "
            "larger than it. For the workshop run every laptop on its CPU, so that the room prints the same "
            "figures: `CUDA_VISIBLE_DEVICES= make lab` (no GPU visible: `auto` picks the CPU), or "
            "`make course DEVICE=cpu`."),
    Trouble("bnb-packed", "A learner's own 4-bit load crashes on a recent CPU (AVX512-BF16: current Xeons, AMD "
            "Zen 4 and later).",
            "AssertionError: N must be divisible by block_n", "bitsandbytes (its packed CPU format)",
            "bitsandbytes picks its packed 4-bit kernel on such CPUs by itself, and the packed format cannot hold "
            "layers whose outputs are not a multiple of its tile (the tiny replica's PLoRA branches). The course's "
            "`load_model()` pins the portable kernel on every CPU (`XCOMP_LAB_BNB_CPU_PATH=portable`, the "
            "default), so the notebooks never crash and every laptop prints the same NF4 figures. Load through "
            "`xcomp_lab.model.loading.load_model`, or call `xcomp_lab.model.bnb_cpu.apply_cpu_path(model)` right "
            "after a load of your own, before the first forward pass."),
    Trouble("bnb-path-value", "Notebook 06 fails at the NF4 load, or its NF4 figures differ from the room's.",
            "ValueError: bitsandbytes CPU path 'fast' is not one of ['portable', 'packed', 'auto']: …",
            "xcomp_lab.model.bnb_cpu",
            "`XCOMP_LAB_BNB_CPU_PATH` is set in the learner's shell: a value that is not a path fails; `packed` or "
            "`auto` run, with other roundings than the room's. Unset it (`unset XCOMP_LAB_BNB_CPU_PATH`), restart "
            "JupyterLab and rerun the notebook."),
    Trouble("kernel-died", "A notebook stops and JupyterLab restarts its kernel; `make course` names the notebook.",
            "The kernel for notebooks/… appears to have died. It will restart automatically.",
            "JupyterLab (`make course` says: DeadKernelError: the notebook's kernel died while this cell ran "
            "(killed, e.g. by the out-of-memory killer); this notebook did not finish)",
            "One notebook does not exhaust a laptop: at tiny scale the largest kernel peaked at "
            "{{ kernel_memory.largest.bytes | bytes }} (`{{ kernel_memory.largest.stem }}`), measured on "
            "{{ kernel_memory.machine }}. What does is kernels left running: JupyterLab keeps the kernel of every "
            "notebook opened until it is shut down, and the {{ kernel_memory.count }} together peak at up to "
            "{{ kernel_memory.total_bytes | bytes }}, beside the browser and the system. Shut each kernel down "
            "when moving on (Kernel > Shut Down Kernel, or the Running panel's Shut Down All), close other heavy "
            "programs, and keep the parameters at their defaults on small laptops (`batch_size` and `image_size` "
            "near their limits make far larger calls)."),
    Trouble("no-module", "The first cell of a notebook fails to import the course.",
            "ModuleNotFoundError: No module named 'xcomp_lab'", "Python: the kernel is not the course's environment",
            "The notebook runs in another Python than `.venv`'s: a JupyterLab started from elsewhere, or another "
            "kernel chosen in the notebook. Start JupyterLab with `make lab` (its `python3` kernel is the venv's) "
            "and pick the \"Python 3\" kernel it lists; `import sys; sys.prefix` in a cell should name `.venv`."),
    Trouble("port-busy", "`make lab` opens on another port, or a browser tab shows a different JupyterLab.",
            "The port 8888 is already in use, trying another port.", "jupyter_server",
            "Another Jupyter server holds the port, often one from an earlier `make lab`, whose kernels may run "
            "another Python. JupyterLab moves on to a free port and prints its URL with the token: use that one, "
            "not a bookmark. List the servers with `.venv/bin/jupyter server list`, stop one with "
            "`.venv/bin/jupyter server stop 8888`, or choose a port: `make lab LAB_ARGS=\"--port=8890\"`."),
    Trouble("widgets", "Notebook 08's planner shows text such as `VBox(children=(...` or an error instead of its "
            "controls.",
            "Error displaying widget: model not found", "the JupyterLab widgets extension",
            "The widget's kernel is gone (a notebook opened with its saved outputs, or a restarted kernel): run the "
            "notebook again (Run > Run All Cells). Plain text instead of controls means the JupyterLab serving the "
            "page lacks the widgets extension (a system or conda JupyterLab, an editor's notebook view): start the "
            "course's own with `make lab`, which has ipywidgets 8 and its extension."),
    Trouble("damaged-checkpoint", "A notebook fails while loading the model.",
            "DamagedCheckpointError: Checkpoint shard …/model.safetensors is damaged: it holds … bytes, its manifest "
            "says … (truncated, emptied or replaced). Delete the folder …: the next trained_tiny_checkpoint() call "
            "(load_model() makes one for scale='tiny') assembles it again from the package's weights.",
            "xcomp_lab.model.manifest",
            "A write was cut short (a full disk, an interrupted copy). Delete the folder the message names (under "
            "`~/.cache/xcomp-lab/checkpoints/`, or `$XCOMP_LAB_CACHE`) and rerun the cell: the tiny captioner is "
            "assembled again from the weights inside the package."),
    Trouble("torn-results", "Notebook 08 (or any notebook that reads the results) fails reading `results.jsonl`.",
            "ValueError: …/results.jsonl:… is not a JSON line (…): the torn end of an interrupted write. The next "
            "append moves it to …/results.jsonl.torn (kept, not deleted); to move it now: from xcomp_lab.core.jsonl "
            "import set_aside_torn_line; set_aside_torn_line('…/results.jsonl')",
            "xcomp_lab.core.jsonl",
            "A run was stopped while it wrote a record (a killed kernel, a full disk). Nothing is lost: the next "
            "notebook that records a measurement sets the fragment aside by itself; to read the file now, run the "
            "line the message gives."),
    Trouble("bad-parameter", "A notebook fails in its first cell after a learner changed a parameter.",
            "ValueError: batch_size=100000; it must be at most 256 (…).", "xcomp_lab.core.checks",
            "The first cell checks every parameter and says what is allowed and why; set it back, or within the "
            "limit. `docs/bad-inputs.md` lists each bad input the course was tested with and the message it gets."),
)


def _find(records: list[dict[str, Any]], step: str, *, with_extra: str | None = None) -> dict[str, Any]:
    """The first record of `step` (that has `with_extra` in its `extra`)."""
    for r in records:
        if r["step"] == step and (with_extra is None or with_extra in (r.get("extra") or {})):
            return r
    detail = f" with extra[{with_extra!r}]" if with_extra else ""
    raise KeyError(f"No record of step {step!r}{detail}; the guide needs it. Steps present: "
                   f"{sorted({r['step'] for r in records})}")


def _find_before(records: list[dict[str, Any]], step: str, anchor: str) -> dict[str, Any]:
    """The last record of `step` before the first record of `anchor` (a notebook's own reference run)."""
    anchor_at = records.index(_find(records, anchor))
    for r in reversed(records[:anchor_at]):
        if r["step"] == step:
            return r
    raise KeyError(f"No record of step {step!r} before {anchor!r}; the guide compares the two.")


def record_run(timings: str | os.PathLike, docs: str | os.PathLike | None = None, note: str = "") -> Path:
    """Copy a course run's `timings.json` and `results.jsonl` into `docs` (default: the checkout's `docs/`), with
    this machine described.

    Run it right after the course, on the same machine and in the same environment (OMP_NUM_THREADS): the
    load averages and the thread setting are read now.
    """
    timings = Path(timings)
    if not timings.is_file():
        raise FileNotFoundError(f"No timings file at {timings}; `python -m xcomp_lab.tools.course --output DIR` writes "
                                "DIR/timings.json.")
    run = json.loads(timings.read_text())
    missing = {"parameters", "seconds"} - set(run)
    if missing:
        raise ValueError(f"{timings} lacks {sorted(missing)}; is it a timings.json written by xcomp_lab.tools.course?")
    results = timings.parent / "results.jsonl"
    records = read_jsonl(results, what="course results", hint="a course run writes <output>/results.jsonl")
    if not records:
        raise ValueError(f"{results} holds no records; did the course run finish?")
    stamps = sorted(r["timestamp"] for r in records)
    first = records[0]
    recorded = {
        "parameters": run["parameters"],
        "seconds": run["seconds"],
        "results": {"first": stamps[0], "last": stamps[-1], "count": len(records)},
        "software": {"torch": first["torch_version"], "transformers": first["transformers_version"]},
        "machine": describe_machine(repository_root()),
        "note": note,
    }
    docs = guide_paths().docs if docs is None else Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / TIMINGS_NAME).write_text(json.dumps(recorded, indent=2) + "\n")
    shutil.copyfile(results, docs / TINY_RESULTS_NAME)
    return docs / TIMINGS_NAME


def _allocated(record: dict[str, Any]) -> str:
    """What PyTorch had allocated when a CUDA OOM was raised, as its error message says."""
    found = re.search(r"([\d.]+ [KMG]iB) is allocated by PyTorch", record.get("error") or "")
    if not found:
        raise ValueError(f"The error of step {record['step']!r} does not say what was allocated: {record['error']!r}")
    return found.group(1)


def _change(new: float, old: float) -> float:
    """The relative change from `old` to `new` (the template shows it as a signed percentage)."""
    return (new - old) / old


def _image_px(record: dict[str, Any]) -> int:
    """The image side a record's run used: its own setting, else the model's vision tower default."""
    return record["params"]["image_size"] or VIT_L14_490["image_size"]


def _tiny(run: dict[str, Any]) -> dict[str, Any]:
    """The recorded tiny-scale run: machine, software, load, note and each notebook's time and goals."""
    names = sorted(run["seconds"])
    lacking = [n for n in names if n[:2] not in GOALS]
    if lacking:
        raise ValueError(f"No learning goals for {lacking}; add them to xcomp_lab.tools.guide.GOALS.")
    total = sum(run["seconds"].values())
    machine, software = run["machine"], run["software"]
    return {
        "records": run["results"]["count"], "first": run["results"]["first"], "last": run["results"]["last"],
        "scale": run["parameters"]["scale"], "device": run["parameters"]["device"],
        "cores": machine["cores"], "cpu": machine["cpu"], "memory_gib": machine.get("memory_gib"),
        "omp_num_threads": machine.get("omp_num_threads"), "torch": software["torch"],
        "transformers": software["transformers"], "load": machine["load_average_1_5_15_min_at_recording"],
        "note": run.get("note") or "", "total_seconds": total,
        "notebooks": [{"name": name, "stem": name.removesuffix(".ipynb"), "seconds": run["seconds"][name],
                       "share": run["seconds"][name] / total, "question": GOALS[name[:2]].question,
                       "goals": GOALS[name[:2]].goals} for name in names],
    }


def _full(full: list[dict[str, Any]], env: dict[str, Any], edition: Path) -> dict[str, Any]:
    """The full-scale GPU run: its card, software, budget and span; and the full-scale edition of the notebooks
    (`edition`): which notebooks, on which GPU and software, and how long each took."""
    stamps = sorted(r["timestamp"] for r in full)
    executed = [p.stem for p in sorted((edition / "notebooks").glob("[0-9][0-9]-*.ipynb"))]
    edition_env = json.loads((edition / "env.json").read_text()) if executed else {}
    seconds = json.loads((edition / "timings.json").read_text())["seconds"] if executed else {}
    return {
        "steps": len(full), "first": stamps[0], "last": stamps[-1], "card_gb": full[0]["params"]["budget_gb"],
        "gpu": env["gpu"], "gpu_gib": env["total_memory_bytes"] / GIB, "torch": env["torch"], "cuda": env["cuda"],
        "transformers": env["transformers"], "executed": executed, "edition_folder": edition.name,
        "edition_gpu": edition_env.get("gpu"), "edition_torch": edition_env.get("torch"),
        "edition_transformers": edition_env.get("transformers"), "edition_minutes": sum(seconds.values()) / 60,
    }


def _eval_mode(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """Training vs eval mode and the gradient modes, tiny scale; the FP32 caption with and without grad, full scale."""
    train, evaluated = _find(tiny, "03-prefill-train-mode"), _find(tiny, "03-prefill-no-grad")
    grad, inference = _find(tiny, "03-prefill-grad-enabled"), _find(tiny, "03-prefill-inference-mode")
    caption_grad, caption_plain = _find(full, "fp32-grad-enabled"), _find(full, "fp32-no-autocast")
    dropout = train["peak_bytes"] - evaluated["peak_bytes"]
    return {
        "train_peak": train["peak_bytes"], "eval_peak": evaluated["peak_bytes"], "dropout": dropout,
        "dropout_share": dropout / evaluated["peak_bytes"], "grad_oom": grad["oom"],
        "grad_budget": grad["budget_bytes"],
        "grad_unbudgeted_peak": grad["extra"].get("unbudgeted_peak_bytes"), "grad_peak": grad["peak_bytes"],
        "inference_peak": inference["peak_bytes"], "caption_grad_peak": caption_grad["peak_bytes"],
        "caption_plain_peak": caption_plain["peak_bytes"],
        "caption_graph": caption_grad["peak_bytes"] - caption_plain["peak_bytes"],
    }


def _quick_start(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """The FP32 quick start's OOM at full scale against the same call without autocast; its outcome at tiny scale."""
    quick, plain, inference = (_find(full, s) for s in ("fp32-quickstart", "fp32-no-autocast", "fp32-inference-mode"))
    if not quick["oom"]:
        raise ValueError("The full-scale quick start no longer ran out of memory; rewrite its answer in "
                         f"xcomp_lab/tools/templates/{TEMPLATE} for the new result.")
    tiny_quick = _find(tiny, "fp32-quickstart")
    return {
        "card_gb": quick["params"]["budget_gb"], "budget": quick["budget_bytes"], "weights": quick["weights_bytes"],
        "asked": re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", quick["error"]).group(1),
        "allocated": _allocated(quick), "plain_peak": plain["peak_bytes"], "inference_peak": inference["peak_bytes"],
        "autocast_cache": quick["peak_bytes"] - plain["peak_bytes"], "tiny_oom": tiny_quick["oom"],
        "decimal_budget": quick["budget_bytes"] == round(quick["params"]["budget_gb"] * 10**9),
        "card_now": card_bytes(quick["params"]["budget_gb"])[1],
        "tiny_peak": tiny_quick["peak_bytes"], "tiny_budget": tiny_quick["budget_bytes"],
    }


def _quantized(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """INT8 and NF4 against FP16: memory and speed at full scale, next-token agreement at tiny scale."""
    fp16, int8, nf4 = (_find(full, s) for s in ("fp16", "int8", "nf4"))
    quality = {"fp16": _find_before(tiny, "fp16", "int8")["extra"], "int8": _find(tiny, "int8")["extra"],
               "nf4": _find(tiny, "nf4")["extra"]}
    return {
        "fp16_weights": fp16["weights_bytes"], "int8_weights": int8["weights_bytes"],
        "nf4_weights": nf4["weights_bytes"], "fp16_peak": fp16["peak_bytes"], "int8_peak": int8["peak_bytes"],
        "nf4_peak": nf4["peak_bytes"], "int8_weights_change": _change(int8["weights_bytes"], fp16["weights_bytes"]),
        "int8_peak_change": _change(int8["peak_bytes"], fp16["peak_bytes"]),
        "speeds": [{"label": r["step"].upper(), "tokens_per_s": r["tokens_per_s"]} for r in (fp16, int8, nf4)],
        "agreement": [{"label": s.upper(), "top1": q["top1_agreement"]} for s, q in quality.items()],
    }


def _offload(tiny: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, Any]:
    """Half the decoder offloaded to disk against the notebook's own FP16 run (tiny scale); full-scale offload steps."""
    offload = _find(tiny, "05-fp16-offload-disk")
    resident = _find_before(tiny, "fp16", "05-fp16-offload-disk")
    return {
        "resident_weights": resident["weights_bytes"], "offloaded_weights": offload["weights_bytes"],
        "weights_change": _change(offload["weights_bytes"], resident["weights_bytes"]),
        "resident_peak": resident["peak_bytes"], "offloaded_peak": offload["peak_bytes"],
        "same_caption": offload["caption"] == resident["caption"],
        "resident_tokens_per_s": resident["tokens_per_s"], "offloaded_tokens_per_s": offload["tokens_per_s"],
        "full_steps": [r["step"] for r in full if "offload" in r["step"] or "device_map" in (r.get("extra") or {})],
    }


def _split(path: Path) -> dict[str, Any] | None:
    """The two-GPU split runs: the per-card budgets and `split_report`'s lines; None without a split.jsonl."""
    if not path.is_file():
        return None
    records = read_jsonl(path, what="two-GPU runs")
    return {"card_gb": sorted({r["per_card_gb"] for r in records if r["kind"] == "split"}),
            "report": split_report(path)}


def _sdpa(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """Eager against sdpa attention: one full-size image at full scale, the largest tiny image at tiny scale."""
    eager, sdpa = _find(full, "fp16"), _find(full, "fp16-sdpa")
    t_eager, t_sdpa = _find(tiny, "04-eager-336px-b1"), _find(tiny, "04-sdpa-336px-b1")
    return {
        "image_px": _image_px(full[0]), "prompt_tokens": full[0]["extra"]["prompt_tokens"],
        "eager_peak": eager["peak_bytes"], "sdpa_peak": sdpa["peak_bytes"], "tiny_image_px": _image_px(t_eager),
        "tiny_prompt_tokens": t_eager["extra"]["prompt_tokens"], "tiny_eager_peak": t_eager["peak_bytes"],
        "tiny_sdpa_peak": t_sdpa["peak_bytes"], "tiny_change": _change(t_sdpa["peak_bytes"], t_eager["peak_bytes"]),
    }


def _half(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """`.half()` after an FP32 load against `dtype=torch.float16` at load: the load at tiny scale, the peaks at full."""
    half, at_load = (_find(tiny, s, with_extra="load_after_bytes")["extra"] for s in ("fp16-half", "fp16"))
    return {
        "fp32_loaded": half["load_before_bytes"], "halved": half["load_after_bytes"],
        "loaded_as_fp16": at_load["load_after_bytes"], "full_half_peak": _find(full, "fp16-half")["peak_bytes"],
        "full_fp16_peak": _find(full, "fp16")["peak_bytes"], "full_device": full[0]["device_name"],
    }


def _estimator(predictions: dict[str, Any], full: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimator's worst error on the steps that fit, and what it predicted for those that ran out of memory."""
    fitting = {step: p["ratio"] for step, p in predictions.items() if not p["measured_oom"]}
    return {
        "worst_error": max(abs(r - 1) for r in fitting.values()), "fitting": len(fitting),
        "oom": [{"step": step, "predicted_oom": p["predicted_oom"], "op": p["oom_op"], "phase": p["oom_phase"],
                 "in_use": p["oom_in_use_bytes"], "allocated": _allocated(_find(full, step))}
                for step, p in predictions.items() if p["measured_oom"]],
    }


def _budget(tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """The scaled card of the tiny run: the card it stands for, its budget and the FP32 weights."""
    quick = _find(tiny, "fp32-quickstart")
    return {"card_gb": quick["params"]["budget_gb"], "budget": quick["budget_bytes"], "weights": quick["weights_bytes"]}


# ------------------------------------------------------------------------------------- questions and their key

QUESTIONS_BLOCK = re.compile(r"^# \*\*Questions\.\*\*(?P<text>.*?)(?=^# %%|^(?!#)|\Z)", re.M | re.S)
QUESTION_NUMBER = re.compile(r"\((\d+)\)\s+")


def notebook_questions(source: Path) -> list[str]:
    """The questions a notebook source ends with ("**Questions.** (1) ... (2) ..."), whitespace normalised."""
    found = QUESTIONS_BLOCK.search(source.read_text(encoding="utf-8"))
    if found is None:
        raise ValueError(f"{source} has no \"**Questions.** (1) ...\" cell; every notebook ends with its questions.")
    text = " ".join(line.removeprefix("#").strip() for line in found.group("text").splitlines())
    parts = QUESTION_NUMBER.split(text)
    numbers = [int(n) for n in parts[1::2]]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"{source}'s questions are numbered {numbers}; number them (1), (2), ... in order.")
    return [" ".join(question.split()) for question in parts[2::2]]


def _environment() -> jinja2.Environment:
    """The Jinja environment of the guide and of the text in its data: undefined values raise, two filters."""
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(_template_source), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, autoescape=False, trim_blocks=True,
                                     lstrip_blocks=True)
    environment.filters["bytes"] = fmt_bytes
    environment.filters["fmt"] = format
    return environment


def _render_text(text: str, context: dict[str, Any]) -> str:
    return _environment().from_string(text).render(context)


def answer_key(sources: Path, stems: list[str], context: dict[str, Any]) -> list[dict[str, Any]]:
    """Each notebook's questions (read from `sources`, the notebooks' .py files) with their answers from ANSWERS.

    A question the key does not answer, or an answer to a question no notebook asks, is refused: a new or
    reworded question cannot go unanswered, and a stale answer cannot stay.
    """
    key = []
    for stem in stems:
        source = sources / f"{stem}.py"
        if not source.is_file():
            raise FileNotFoundError(f"No source for {stem} at {source}; the answer key reads each notebook's questions "
                                    "from notebooks/src/.")
        asked = notebook_questions(source)
        answers = {" ".join(a.question.split()): a for a in ANSWERS.get(stem[:2], ())}
        unanswered = [(n, q) for n, q in enumerate(asked, start=1) if q not in answers]
        if unanswered:
            listed = "; ".join(f"({n}) {q!r}" for n, q in unanswered)
            raise ValueError(f"{stem} asks questions the answer key does not answer: {listed}. Add an Answer with "
                             f"that question's text to xcomp_lab.tools.guide.ANSWERS[{stem[:2]!r}] (a reworded "
                             "question needs its answer checked again).")
        stale = [q for q in answers if q not in asked]
        if stale:
            raise ValueError(f"xcomp_lab.tools.guide.ANSWERS[{stem[:2]!r}] answers questions {stem} no longer asks: "
                             f"{stale}. Update or remove them.")
        key.append({"stem": stem, "questions": [
            {"number": n, "question": q, "answer": _render_text(answers[q].answer, context),
             "where": _render_text(answers[q].where, context)} for n, q in enumerate(asked, start=1)]})
    return key


def _size_in(message: str, pattern: str) -> int:
    """Bytes of the size (e.g. "329.01 MiB") that `pattern`'s group finds in an error message."""
    found = re.search(pattern, message)
    if not found:
        raise ValueError(f"No size matching {pattern!r} in the message: {message!r}")
    number, unit = found.group(1).split()
    return round(float(number) * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GIB}[unit])


def _card(card: Card) -> dict[str, Any]:
    return {"name": card.name, "gb": card.marketed_gb, "total_bytes": card.total_bytes,
            "usable_bytes": card.usable_bytes}


def _key_figures(full: list[dict[str, Any]], tiny: list[dict[str, Any]], predictions: dict[str, Any]) -> dict[str, Any]:
    """What the answer key quotes, computed from the recorded runs, the card catalogue and the full configuration."""
    fp32, fp16, quick = _find(full, "fp32-no-autocast"), _find(full, "fp16"), _find(full, "fp32-quickstart")
    need = predictions["fp32-quickstart"]["predicted_peak_bytes"]
    story = card_for_gb(quick["params"]["budget_gb"])  # the course's card of the story's size
    class24 = cards_of_class(24)
    config = config_for_scale("full")
    full_tokens = full[0]["extra"]["prompt_tokens"]
    tiny_tokens = _find(tiny, "fp16")["extra"]["prompt_tokens"]
    text_tokens = full_tokens - image_tokens(config)
    heads, patch = config.num_attention_heads, config.vision_config.patch_size
    fp32_bytes = torch.finfo(torch.float32).bits // 8
    softmax_tokens = math.ceil(math.sqrt(GIB / (heads * fp32_bytes)))  # heads x T x T FP32 scores = 1 GiB
    patches = math.ceil(math.sqrt(softmax_tokens - text_tokens))
    grad, no_grad = _find(tiny, "03-prefill-grad-enabled"), _find(tiny, "03-prefill-no-grad")
    grad_need = grad["extra"].get("unbudgeted_peak_bytes") or grad["peak_bytes"]
    quality = {r["step"]: r for r in tiny if "exact_match" in (r.get("extra") or {}) and not r["oom"]}
    best = min(quality.values(), key=lambda r: r["peak_bytes"])
    reference = quality["fp32-no-autocast"]
    sweep = {(r["step"].split("-")[1], r["extra"]["image_size"], r["extra"]["batch"]): r["peak_bytes"]
             for r in tiny if r["step"].startswith("04-")}  # (attention, px, batch) -> peak, notebook 04's runs
    sizes = sorted({px for kind, px, batch in sweep if kind == "eager" and batch == 1})
    batched = min(px for kind, px, batch in sweep if batch == 2)
    return {
        "fp32_weights": fp32["weights_bytes"], "fp32_peak": fp32["peak_bytes"],
        "fp16_weights": fp16["weights_bytes"], "fp16_call": fp16["peak_bytes"] - fp16["weights_bytes"],
        "fp32_call": fp32["peak_bytes"] - fp32["weights_bytes"], "half_peak": _find(full, "fp16-half")["peak_bytes"],
        "quick_need": need,
        "quick_fits": [{"name": c.name, "spare": c.usable_bytes - need} for c in CARDS.values()
                       if c.usable_bytes >= need],
        "story_card": {"name": story.name, "short": need - story.usable_bytes},
        "unallocated": _size_in(quick["error"], r"([\d.]+ [KMG]?i?B) is reserved by PyTorch but unallocated"),
        "asked": _size_in(quick["error"], r"Tried to allocate ([\d.]+ [KMG]?i?B)"),
        "card24": _card(card_for_gb(24)),
        "class24": {"gb": 24, "low": _card(class24[0]), "high": _card(class24[-1])},
        "fp16_max": torch.finfo(torch.float16).max,
        "bf16_diff": _find(tiny, "bf16", with_extra="max_abs_diff")["extra"]["max_abs_diff"],
        "fp16_diff": _find(tiny, "fp16", with_extra="max_abs_diff")["extra"]["max_abs_diff"],
        "grad_oom": grad["oom"], "grad_need": grad_need, "grad_ratio": grad_need / no_grad["peak_bytes"],
        "heads": heads, "kv_heads": config.num_key_value_heads, "patch": patch, "fp32_bytes": fp32_bytes,
        "softmax": {"tokens": softmax_tokens, "text_tokens": text_tokens,
                    "image_tokens": softmax_tokens - text_tokens, "patches": patches, "side": patches * patch,
                    "original_side": config.vision_config.image_size, "per_image": image_tokens(config),
                    "images": math.ceil((softmax_tokens - text_tokens) / image_tokens(config))},
        "full_tokens": full_tokens, "tiny_tokens": tiny_tokens,
        "full_scores": eager_scores_bytes(config, 1, full_tokens),
        "logits": {"full": logits_peak_bytes(config, 1, full_tokens), "last": logits_peak_bytes(config, 1, 1),
                   "full_saving": logits_peak_bytes(config, 1, full_tokens) - logits_peak_bytes(config, 1, 1),
                   "tiny_saving": (logits_peak_bytes(config_for_scale("tiny"), 1, tiny_tokens)
                                   - logits_peak_bytes(config_for_scale("tiny"), 1, 1))},
        "lever": {"batch": sweep["eager", batched, 2] - sweep["eager", batched, 1], "big_px": sizes[-1],
                  "mid_px": sizes[-2], "size": sweep["eager", sizes[-1], 1] - sweep["eager", sizes[-2], 1],
                  "sdpa": sweep["eager", sizes[-1], 1] - sweep["sdpa", sizes[-1], 1]},
        "nf4_share": _find(full, "nf4")["weights_bytes"] / fp16["weights_bytes"],
        "best": {"step": best["step"], "peak": best["peak_bytes"],
                 "share": best["peak_bytes"] / reference["peak_bytes"],
                 "exact": best["extra"]["exact_match"], "fp32_exact": reference["extra"]["exact_match"],
                 "n": best["extra"].get("n"), "fp32_n": reference["extra"].get("n")},
    }


# -------------------------------------------------------------------- agenda, exercises, troubleshooting, memory

NOTEBOOK_PREFIX = re.compile(r"\d\d")


def _agendas(tiny: dict[str, Any]) -> list[dict[str, Any]]:
    """Each agenda with its minutes checked (they add up; every timed notebook has a slot) and set against the
    machine seconds of the recorded run."""
    timed = {notebook["name"][:2]: notebook for notebook in tiny["notebooks"]}
    agendas = []
    for agenda in AGENDAS:
        planned = sum(slot.minutes for slot in agenda.slots)
        if planned != agenda.minutes:
            raise ValueError(f"The {agenda.name}'s slots add up to {planned} minutes, not {agenda.minutes}; fix "
                             "xcomp_lab.tools.guide.AGENDAS.")
        named = [slot.what for slot in agenda.slots if NOTEBOOK_PREFIX.fullmatch(slot.what)]
        missing = sorted(set(timed) - set(named))
        if missing:
            raise ValueError(f"The {agenda.name} leaves out notebooks {missing}; give every notebook a slot in "
                             "xcomp_lab.tools.guide.AGENDAS.")
        # A notebook newer than the recorded run keeps its slot, untimed until `make guide` records it.
        untimed = sorted(set(named) - set(timed))
        slots = [{"what": slot.what, "notebook": timed.get(slot.what), "minutes": slot.minutes, "plan": slot.plan,
                  "cut": slot.cut, "minutes_if_cut": slot.minutes_if_cut, "essential": slot.essential}
                 for slot in agenda.slots]
        machine = sum(timed[name]["seconds"] for name in named if name in timed)
        agendas.append({"name": agenda.name, "minutes": agenda.minutes, "slots": slots, "untimed": untimed,
                        "minutes_if_cut": sum(slot["minutes_if_cut"] for slot in slots),
                        "machine_seconds": machine, "machine_share": machine / (agenda.minutes * 60)})
    return agendas


def _exercises(tiny: dict[str, Any]) -> dict[str, Any]:
    """Every exercise the notebooks ask (course.exercises.EXERCISES), with the plan for revealing them."""
    stems = {notebook["name"][:2]: notebook["stem"] for notebook in tiny["notebooks"]}
    rows = []
    for exercise in EXERCISES.values():
        if exercise.notebook not in stems:
            raise ValueError(f"Exercise {exercise.key} belongs to notebook {exercise.notebook}, which the recorded run "
                             "did not time.")
        rows.append({"key": exercise.key, "stem": stems[exercise.notebook], "variable": exercise.variable,
                     "what": exercise.what, "too_low": exercise.too_low, "too_high": exercise.too_high,
                     "answer": f"answer_{exercise.key.replace('.', '_')}"})
    return {"rows": rows, "guess_minutes": EXERCISE_PLAN.guess_minutes,
            "discuss_minutes": EXERCISE_PLAN.discuss_minutes, "well_done": WELL_DONE, "close": CLOSE}


def _kernel_memory(path: Path) -> dict[str, Any]:
    """The recorded peak memory of each notebook's kernel at tiny scale (`measure_kernel_memory`), summed up."""
    recorded = json.loads(path.read_text())
    peaks, machine = recorded["peak_rss_bytes"], recorded["machine"]
    largest = max(peaks, key=peaks.get)
    return {"largest": {"stem": largest.removesuffix(".ipynb"), "bytes": peaks[largest]},
            "total_bytes": sum(peaks.values()), "count": len(peaks), "environment_bytes": recorded["environment_bytes"],
            "machine": (f"a {machine['cores']}-core {machine['cpu']} CPU ({machine['memory_gib']:g} GiB RAM) on "
                        f"{recorded['measured'][:10]}, torch {recorded['software']['torch']}")}


def _troubles(context: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": t.key, "symptom": t.symptom, "message": t.message, "source": t.source,
             "fix": _render_text(t.fix, context)} for t in TROUBLES]


def measure_kernel_memory(out: Path, notebooks_dir: Path | None = None, note: str = "") -> Path:
    """Record the peak memory of each notebook's kernel at tiny scale on this CPU, as JSON at `out`.

    Each executed notebook (`notebooks/NN-*.ipynb`) runs under papermill in a fresh process, as a course run does
    (one results file for all, in a temporary folder); the peak resident memory of the largest process it made
    (its kernel) is read from `getrusage(RUSAGE_CHILDREN).ru_maxrss` (Linux, KiB). Also recorded: the size of this
    Python environment (`sys.prefix`), the machine and the software.
    """
    import transformers

    folder = repository_root() / "notebooks" if notebooks_dir is None else Path(notebooks_dir)
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="xcomp-kernel-memory-") as scratch:
        for notebook in sorted(folder.glob("[0-9][0-9]-*.ipynb")):
            command = [sys.executable, "-m", "papermill", str(notebook), str(Path(scratch) / notebook.name),
                       "-p", "scale", "tiny", "-p", "device", "cpu", "-p", "results_path",
                       str(Path(scratch) / "results.jsonl"), "--cwd", str(folder), "--log-level", "ERROR"]
            done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                                  env=environment)
            kib, code = done.stdout.split()[-2:]
            if code != "0":
                raise RuntimeError(f"{notebook.name} failed under papermill (exit {code}):\n{done.stderr[-3000:]}")
            peaks[notebook.name] = int(kib) * 1024
    recorded = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": inspect.getdoc(measure_kernel_memory).split("\n\n")[1],
        "peak_rss_bytes": peaks,
        "environment_bytes": sum(f.stat().st_size for f in Path(sys.prefix).rglob("*") if f.is_file()
                                 and not f.is_symlink()),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": describe_machine(repository_root()), "note": note,
    }
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    return out


def guide_context(paths: GuidePaths | None = None) -> dict[str, Any]:
    """Every value the template needs, read and computed from the inputs `paths` names (default: the checkout's)."""
    paths = guide_paths() if paths is None else paths
    if not paths.timings.is_file():
        raise FileNotFoundError(f"No recorded run at {paths.timings}; record one with "
                                "`python -m xcomp_lab.tools.guide --timings <course-output>/timings.json`.")
    for name in ("results.jsonl", "env.json", "predictions.json"):
        if not (paths.full / name).is_file():
            raise FileNotFoundError(f"{paths.full} lacks {name}; "
                                    f"`python -m xcomp_lab.tools.gpu_run --out {paths.full}` writes it.")
    run = json.loads(paths.timings.read_text())
    tiny = read_jsonl(paths.tiny_results, what="tiny-scale results",
                      hint="record a course run with `python -m xcomp_lab.tools.guide --timings <output>/timings.json`")
    full = read_jsonl(paths.full / "results.jsonl", what="full-scale results")
    env = json.loads((paths.full / "env.json").read_text())
    predictions = json.loads((paths.full / "predictions.json").read_text())
    context = {
        "tiny": _tiny(run), "full": _full(full, env, paths.edition), "eval_mode": _eval_mode(full, tiny),
        "quick_start": _quick_start(full, tiny), "quantized": _quantized(full, tiny), "offload": _offload(tiny, full),
        "split": _split(paths.split), "sdpa": _sdpa(full, tiny), "half": _half(full, tiny),
        "estimator": _estimator(predictions, full), "budget": _budget(tiny),
        "key": _key_figures(full, tiny, predictions),
        "kernel_memory": _kernel_memory(paths.kernel_memory), "kernel_memory_file": KERNEL_MEMORY_NAME,
    }
    context["agendas"] = _agendas(context["tiny"])
    context["exercises"] = _exercises(context["tiny"])
    context["troubles"] = _troubles(context)
    context["answer_key"] = answer_key(paths.sources, [n["stem"] for n in context["tiny"]["notebooks"]], context)
    return context


def _template_source(name: str) -> tuple[str, str, None]:
    """A template shipped in xcomp_lab/tools/templates, read through importlib.resources."""
    found = package_file("xcomp_lab.tools", "templates", name)
    return found.read_text(encoding="utf-8"), str(found), None


def guide_template() -> jinja2.Template:
    """The guide's template; an undefined value raises jinja2.UndefinedError instead of rendering empty."""
    return _environment().get_template(TEMPLATE)


def render_guide(paths: GuidePaths | None = None) -> str:
    """The guide as markdown, from the recorded runs `paths` names (default: the checkout's)."""
    return guide_template().render(guide_context(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timings", type=Path, help="a course run's timings.json to record into docs/ first")
    parser.add_argument("--note", default="", help="what else ran on the machine, checkpoint used, ...")
    parser.add_argument("--check", action="store_true", help="only check that the committed guide is current")
    parser.add_argument("--kernel-memory", action="store_true",
                        help=f"first measure each notebook kernel's peak memory at tiny scale into the package's "
                             f"docs/{KERNEL_MEMORY_NAME} (a few minutes)")
    args = parser.parse_args(argv)
    if args.check and (args.timings or args.kernel_memory):
        parser.error("--check compares the committed guide with the committed inputs; it records nothing")
    paths = guide_paths()
    if args.timings:
        print(f"recorded {record_run(args.timings, paths.docs, note=args.note)}")
    if args.kernel_memory:
        print(f"recorded {measure_kernel_memory(paths.kernel_memory, note=args.note)}")
    text = render_guide(paths)
    if args.check:
        current = paths.guide.is_file() and paths.guide.read_text() == text
        print(f"{paths.guide} is {'current' if current else 'stale: run python -m xcomp_lab.tools.guide'}")
        return 0 if current else 1
    paths.guide.write_text(text)
    print(f"guide written to {paths.guide}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
