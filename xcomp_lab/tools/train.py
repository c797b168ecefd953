"""Train the tiny replica to caption the synthetic scenes, on a CPU.

A random-weight replica answers with word salad, so caption quality after FP16, INT8 or NF4 would mean
nothing. Here the tiny scale (exactly `config_for_scale("tiny")`, PLoRA included) learns to caption the
scenes of `xcomp_lab.data.scenes` through the very prompt `chat()` builds, image tokens spliced in at
`<ImageHere>` as `interleav_wrap_chat` does, each text part tokenized on its own with BOS:

    <s> system ... user\\n | image tokens (im_mask True) | <s> Describe ... assistant\\n | caption [UNUSED_TOKEN_145]

The loss covers only the caption and the end-of-turn token that makes `chat()` stop. Two things keep a
step cheap: the system prompt before the image is the same for every example and sees no image, so it
runs once per step and its KV cache is repeated across the batch (the gradient still flows through
it); and each step draws a fresh batch of scenes from its own data seed (1000 + step), so nothing is held
in memory and no image is seen twice.

The default settings are the recipe of the captioner the course ships (xcomp_lab/model/trained/,
loaded by `default_checkpoint("tiny")`): 4,000 steps of 32 scenes, 7 minutes on an H100 and about two
hours on a 2-core CPU. Retrain and export it with

    python -m xcomp_lab.tools.train --out <dir> --device cuda     # or --device cpu: deterministic, slower

then copy <dir>/model.safetensors over xcomp_lab/model/trained/tiny-captioner.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from xcomp_lab.data import scenes
from xcomp_lab.model.checkpoint import DONE_MARKER, course_tokenizer, move_into_place, write_model_files
from xcomp_lab.model.modeling_internlm_xcomposer2 import (
    DEFAULT_META_INSTRUCTION,
    IM_END,
    IMAGE_PLACEHOLDER,
    InternLMXComposer2ForCausalLM,
)
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.model.tokenizer import CAPTION_QUERY
from xcomp_lab.run.captioning import evaluate_captioner

# Bump when the training recipe changes in a way the settings below do not capture.
TRAINING_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; the defaults are the course's captioner."""

    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 5e-4  # measured: 1e-3 reached 95.5% exact match against 98.5% for 5e-4
    warmup_steps: int = 20  # a run shorter than this is all warmup
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak learning rate
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}; pass a positive int.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}; pass a non-negative int.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r}; pass a positive float, e.g. 5e-4.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}; pass a non-negative int.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r}; pass a fraction in [0, 1].")


DEFAULT = TrainSettings()


@dataclass
class TrainResult:
    """The trained model (FP32, eval mode, on the training device), its tokenizer, every step's loss, the checkpoint."""

    model: InternLMXComposer2ForCausalLM
    tokenizer: PreTrainedTokenizerBase
    settings: TrainSettings
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    checkpoint: Path | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10 steps (a single step's loss is noisy)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


@dataclass(frozen=True)
class CaptionPrompt:
    """Token ids of the two text parts of the caption prompt, around the image, each with BOS."""

    before_image: torch.Tensor  # (1, t0)
    after_image: torch.Tensor  # (1, t1)

    @classmethod
    def build(
        cls, tokenizer: PreTrainedTokenizerBase, query: str = CAPTION_QUERY, device: str | torch.device = "cpu"
    ) -> CaptionPrompt:
        prompt = InternLMXComposer2ForCausalLM.build_prompt(IMAGE_PLACEHOLDER + query, (), DEFAULT_META_INSTRUCTION)
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        return cls(*(tokenizer(part, return_tensors="pt").input_ids.to(device) for part in (before, after)))


def answer_batch(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions followed by the end-of-turn token, right-padded: ids (B, L) and a mask (B, L), True on real tokens."""
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    rows = [tokenizer(text, add_special_tokens=False).input_ids + [end_of_turn] for text in captions]
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = True
    return ids, mask  # (B, L), (B, L)


def caption_loss(
    model: InternLMXComposer2ForCausalLM,
    prompt: CaptionPrompt,
    pixels: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch; the system prompt runs once for the batch."""
    batch, device = pixels.shape[0], pixels.device
    embed = model.get_input_embeddings()
    # The text before the image has no image tokens (im_mask None == all False) and is the same for all.
    prefix = model(inputs_embeds=embed(prompt.before_image), use_cache=True)
    cache = prefix.cache
    cache.batch_repeat_interleave(batch)
    image = model.vision_proj(model.vit(pixels))  # (B, P, C)
    after = embed(prompt.after_image).expand(batch, -1, -1)  # (B, t1, C)
    embeds = torch.cat([image, after, embed(answer_ids)], dim=1)  # (B, P + t1 + L, C)
    unscored = image.shape[1] + after.shape[1]
    im_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=device)
    im_mask[:, : image.shape[1]] = True
    seen = torch.ones(batch, prompt.before_image.shape[1] + unscored, dtype=torch.long, device=device)
    attention_mask = torch.cat([seen, answer_mask.long()], dim=1)  # (B, t0 + P + t1 + L)
    unscored_labels = torch.full((batch, unscored), -100, device=device)
    labels = torch.cat([unscored_labels, answer_ids.masked_fill(~answer_mask, -100)], dim=1)
    out = model(
        inputs_embeds=embeds, attention_mask=attention_mask, im_mask=im_mask, labels=labels, cache=cache, use_cache=True
    )
    return out.loss


def _batch(
    model: InternLMXComposer2ForCausalLM, tokenizer: PreTrainedTokenizerBase, step: int, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's own fresh scenes (data seed 1000 + step): pixels as `chat()` preprocesses them, answers."""
    data = scenes.make_dataset(settings.batch_size, scenes.TRAIN_SEED_START + step, image_size=model.config.image_size)
    pixels = torch.stack([model.vis_processor(image) for image, _ in data])  # (B, 3, S, S)
    ids, mask = answer_batch(tokenizer, [text for _, text in data])
    device = model.get_input_embeddings().weight.device
    return pixels.to(device), ids.to(device), mask.to(device)


def _schedule(settings: TrainSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_captioner(
    steps: int = DEFAULT.steps,
    batch_size: int = DEFAULT.batch_size,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **settings: float,
) -> TrainResult:
    """Train the tiny replica on scene captions; save it to `out_dir` as an FP16 checkpoint if given.

    Extra keyword arguments override the other fields of `TrainSettings` (learning_rate, warmup_steps, ...).
    On the CPU the run is deterministic for a seed; a GPU (`device="cuda"`) trains in seconds, to
    other, equally good weights.
    """
    unknown = set(settings) - set(TrainSettings.__dataclass_fields__)
    if unknown:
        known = sorted(TrainSettings.__dataclass_fields__)
        raise TypeError(f"Unknown training settings {sorted(unknown)}; pass fields of TrainSettings: {known}.")
    plan = TrainSettings(steps=steps, batch_size=batch_size, seed=seed, **settings)
    started = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    device = torch.device(device)
    # cuBLAS is only deterministic with a workspace setting made before CUDA starts; warn there instead.
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        torch.manual_seed(plan.seed)
        model = InternLMXComposer2ForCausalLM(config_for_scale("tiny")).to(device).train()
        tokenizer = course_tokenizer()
        prompt = CaptionPrompt.build(tokenizer, device=device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=plan.learning_rate, betas=(0.9, 0.95), weight_decay=plan.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(plan))
        result = TrainResult(model, tokenizer, plan)
        bar = tqdm(range(plan.steps), desc="training tiny captioner", disable=not progress)
        for step in bar:
            loss = caption_loss(model, prompt, *_batch(model, tokenizer, step, plan))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), plan.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        bar.close()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    result.wall_s = time.perf_counter() - started
    if out_dir is not None:
        record = {**asdict(plan), "wall_s": result.wall_s, "final_loss": result.final_loss}
        result.checkpoint = save_checkpoint(model, tokenizer, Path(out_dir), record)
    return result


def save_checkpoint(
    model: InternLMXComposer2ForCausalLM, tokenizer: PreTrainedTokenizerBase, directory: Path, record: dict[str, Any]
) -> Path:
    """Write a released-style checkpoint (FP16 safetensors, config, sources, tokenizer) and mark it complete.

    It is written next to `directory` and renamed into place, so a half-written one is never found.
    """
    staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    config = config_for_scale("tiny")
    config.dtype = "float16"  # released weights are FP16; dtype=float32 at load upcasts them
    write_model_files(staging, config, tokenizer)
    weights = {name: t.detach().to("cpu", torch.float16).contiguous() for name, t in model.state_dict().items()}
    save_file(weights, staging / WEIGHTS_NAME, metadata={"format": "pt"})
    (staging / DONE_MARKER).write_text(json.dumps({"trained": True, **record}, indent=2))
    move_into_place(staging, directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    """Command line: train, save the checkpoint, and report held-out quality (see --help)."""
    parser = argparse.ArgumentParser(prog="python -m xcomp_lab.tools.train", description=main.__doc__)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    parser.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT.learning_rate)
    parser.add_argument("--seed", type=int, default=DEFAULT.seed)
    parser.add_argument("--device", default="cpu", help="cpu (deterministic) or cuda")
    parser.add_argument("--evaluate", type=int, default=200, help="held-out scenes to caption afterwards (0: none)")
    args = parser.parse_args(argv)
    result = train_captioner(
        args.steps, args.batch_size, args.seed, out_dir=args.out, device=args.device, learning_rate=args.learning_rate
    )
    summary: dict[str, Any] = {"wall_s": round(result.wall_s, 1), "final_loss": round(result.final_loss, 4)}
    if args.evaluate:
        report = evaluate_captioner(result.model, result.tokenizer, args.evaluate, batch_size=50)
        summary.update(exact_match=report.exact_match, token_accuracy=report.token_accuracy)
    Path(args.out, "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
