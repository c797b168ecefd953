"""Checkpoints that run the original model's own remote code, laid out like the released InternLM-XComposer2-VL-7B.

The course's replica is not the code users run: the real checkpoint ships five remote-code files and pins
transformers 4.33.2. `build_original_checkpoint(code_dir)` copies those five files from `code_dir` (a downloaded
checkpoint's folder, or the reference copy the tests use) into a new checkpoint directory with random weights
under the original's parameter names, so `AutoModel.from_pretrained(path, trust_remote_code=True)` runs exactly
the user's code path. It writes:

- `config.json` as the released model's family publishes it (`auto_map` naming the code files, `max_length`,
  `img_size`, dynamic rope scaling...), `tokenizer_config.json` (whose `auto_map` names the tokenizer class) and
  `special_tokens_map.json`;
- safetensors shards of random weights, written shard by shard (the full scale never holds more than one shard);
- a sentencepiece `tokenizer.model`, trained at build time on the chat template and system prompt read from the
  given modeling code plus the course's captions, with exactly `vocab_size` pieces (filled up with
  `[UNUSED_TOKEN_n]` pieces, among them the chat's `[UNUSED_TOKEN_145]`/`[UNUSED_TOKEN_146]`), so every id a
  random model generates decodes;
- beside the checkpoint, a Hugging Face home whose hub cache holds `openai/clip-vit-large-patch14-336` (config
  and random vision-tower weights, the only tensors `CLIPVisionModel` reads), which the original's constructor
  loads by name: `OriginalCheckpoint.environment()` gives the variables (`HF_HOME`, `HF_HUB_CACHE`, offline
  mode) to set before transformers is imported.

Two scales: `full` is the released size (942 tensors, 8,666,840,064 parameters). The original code hard-codes
the decoder width 4096 (the projector's output), CLIP's width 1024 with its 24 x 24 -> 35 x 35 position grid
(336 -> 490 px, 1225 image tokens) and PLoRA rank 256, so `small` keeps those and shrinks only what the config
sets: one decoder layer, intermediate size 256, a 1024-piece vocabulary, one CLIP layer of intermediate size 256.
That is 89,121,024 parameters in 47 tensors (182 MB in FP16); a caption's prompt is still 1349 tokens (1225 of
them the image's) at the real widths, so one caption of a sample scene (8 new tokens, FP32) took 7 s on this
project's 2-core CPU.

Building needs torch, safetensors, filelock and sentencepiece (and the course's numpy and pillow) but not
transformers, so it runs in the original's own environment (`make venv-original`, transformers 4.33.2) as well as
anywhere else those are installed; loading must run in that environment. Builds are cached under $XCOMP_LAB_CACHE (default ~/.cache/xcomp-lab)
in `original/`, keyed by the configuration, the code files and this module, written into a staging folder and
renamed into place under a file lock, with the course's shard manifest.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import save_file

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.core.dtypes import check_dtype, dtype_name
from xcomp_lab.data.scenes import VOCABULARY, caption, make_scenes
from xcomp_lab.model.manifest import has_manifest, write_manifest

CODE_FILES = (
    "configuration_internlm_xcomposer2.py",
    "modeling_internlm_xcomposer2.py",
    "modeling_internlm2.py",
    "build_mlp.py",
    "tokenization_internlm_xcomposer2.py",
)
MODEL_CLASS = "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
    "AutoModel": MODEL_CLASS,
    "AutoModelForCausalLM": MODEL_CLASS,
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
CLIP_REPO = "openai/clip-vit-large-patch14-336"
CHECKPOINT_NAME = "internlm-xcomposer2-vl-7b"
INDEX_NAME = "model.safetensors.index.json"
DONE_MARKER = ".xcomp-lab-original-complete"
DEFAULT_SHARD_BYTES = 2 * 1024**3
PLORA_RANK = 256
PROJECTOR_WIDTH = 4096  # build_mlp.build_vision_projector: Linear(1024, 4096), GELU, Linear(4096, 4096)
CLIP_WIDTH = 1024
IMAGE_GRID = 35  # build_mlp.CLIPVisionTower.resize_pos: 24 x 24 -> 35 x 35 patches (490 px)

# The released model's config.json, as its published siblings (the 4-bit release, fine-tunes) agree on it. Its
# use_cache=false does not turn the cache off in chat(): transformers 4.33.2's generate passes use_cache=True.
FULL_CONFIG: dict[str, Any] = {
    "architectures": ["InternLMXComposer2ForCausalLM"],
    "auto_map": AUTO_MAP,
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": PROJECTOR_WIDTH,
    "img_size": IMAGE_GRID * 14,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_length": 4096,
    "max_position_embeddings": 32768,
    "model_type": "internlm",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 1.0, "type": "dynamic"},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.33.2",
    "use_cache": False,
    "vocab_size": 92544,
}
# openai/clip-vit-large-patch14-336's vision tower (its config.json's vision_config).
FULL_CLIP_VISION: dict[str, Any] = {
    "hidden_size": CLIP_WIDTH,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "num_channels": 3,
}
CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SCALES: dict[str, dict[str, Any]] = {
    "full": {"config": {}, "clip": {}},
    "small": {
        "config": {"num_hidden_layers": 1, "intermediate_size": 256, "vocab_size": 1024},
        "clip": {"num_hidden_layers": 1, "intermediate_size": 256},
    },
}


def check_original_scale(scale: str) -> str:
    """`scale` if it is one of the original-code scales, else a ValueError naming them."""
    return check_choice("scale", scale, SCALES, hint="'small' captions on a CPU in seconds, 'full' is the 7B-VL size")


def original_config(scale: str) -> dict[str, Any]:
    """The config.json of the original-code checkpoint at `scale` (storage dtype float16)."""
    return {**FULL_CONFIG, **SCALES[check_original_scale(scale)]["config"]}


def clip_config(scale: str) -> dict[str, Any]:
    """The config.json of `openai/clip-vit-large-patch14-336` as the hub cache of `scale` holds it."""
    vision = {**FULL_CLIP_VISION, **SCALES[check_original_scale(scale)]["clip"]}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 768,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": CLIP_TEXT,
        "vision_config": vision,
        "torch_dtype": "float32",
        "transformers_version": "4.33.2",
    }


def _clip_vision_shapes(vision: dict[str, Any], prefix: str, grid: int) -> dict[str, tuple[int, ...]]:
    """A CLIPVisionModel's parameters (transformers 4.33.2 order) with a position grid of `grid` x `grid`."""
    width, inner, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}embeddings.class_embedding": (width,),
        f"{prefix}embeddings.patch_embedding.weight": (width, vision["num_channels"], patch, patch),
        f"{prefix}embeddings.position_embedding.weight": (grid * grid + 1, width),
        f"{prefix}pre_layrnorm.weight": (width,),
        f"{prefix}pre_layrnorm.bias": (width,),
    }
    for index in range(vision["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{index}."
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}self_attn.{projection}.weight"] = (width, width)
            shapes[f"{layer}self_attn.{projection}.bias"] = (width,)
        shapes.update({
            f"{layer}layer_norm1.weight": (width,), f"{layer}layer_norm1.bias": (width,),
            f"{layer}mlp.fc1.weight": (inner, width), f"{layer}mlp.fc1.bias": (inner,),
            f"{layer}mlp.fc2.weight": (width, inner), f"{layer}mlp.fc2.bias": (width,),
            f"{layer}layer_norm2.weight": (width,), f"{layer}layer_norm2.bias": (width,),
        })
    shapes[f"{prefix}post_layernorm.weight"] = (width,)
    shapes[f"{prefix}post_layernorm.bias"] = (width,)
    return shapes


def original_parameter_shapes(scale: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of the original model at `scale` by its state-dict name, in the original's order.

    The state dict holds exactly these (every buffer of the original is non-persistent); at `full` that is 942
    tensors and 8,666,840,064 values, which tests check against the original code on the meta device.
    """
    config = original_config(scale)
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (vocab, hidden)}
    for index in range(config["num_hidden_layers"]):
        layer = f"model.layers.{index}."
        plora = {
            "attention.wqkv": (hidden, qkv), "attention.wo": (hidden, hidden),
            "feed_forward.w1": (hidden, inner), "feed_forward.w3": (hidden, inner), "feed_forward.w2": (inner, hidden),
        }
        for name, (n_in, n_out) in plora.items():
            shapes[f"{layer}{name}.weight"] = (n_out, n_in)
            shapes[f"{layer}{name}.Plora_A.weight"] = (PLORA_RANK, n_in)
            shapes[f"{layer}{name}.Plora_B.weight"] = (n_out, PLORA_RANK)
        shapes[f"{layer}attention_norm.weight"] = (hidden,)
        shapes[f"{layer}ffn_norm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["output.weight"] = (vocab, hidden)
    vision = clip_config(scale)["vision_config"]
    shapes.update(_clip_vision_shapes(vision, "vit.vision_tower.vision_model.", IMAGE_GRID))
    shapes.update({
        "vision_proj.0.weight": (PROJECTOR_WIDTH, CLIP_WIDTH), "vision_proj.0.bias": (PROJECTOR_WIDTH,),
        "vision_proj.2.weight": (PROJECTOR_WIDTH, PROJECTOR_WIDTH), "vision_proj.2.bias": (PROJECTOR_WIDTH,),
    })
    return shapes


def original_parameter_count(scale: str) -> int:
    """The number of parameter values of the original model at `scale` (8,666,840,064 at `full`)."""
    return sum(math.prod(shape) for shape in original_parameter_shapes(scale).values())


@dataclass(frozen=True)
class OriginalCheckpoint:
    """A built original-code checkpoint: `path` loads with trust_remote_code once `environment()` is in force."""

    root: Path  # the build: the checkpoint and hf-home/
    scale: str

    @property
    def path(self) -> Path:
        """The checkpoint directory (what from_pretrained is given), named as the released model's download."""
        return self.root / CHECKPOINT_NAME

    @property
    def hf_home(self) -> Path:
        """The Hugging Face home whose hub cache holds CLIP for the original's constructor."""
        return self.root / "hf-home"

    def environment(self) -> dict[str, str]:
        """Variables to set before transformers is imported: this build's hub cache, offline.

        transformers 4.33.2 finds its cache through HF_HOME, huggingface_hub through HF_HUB_CACHE; the remote
        code is copied into HF_HOME's modules/ as on a user's machine. Both libraries read them once, at import:
        a process loads the builds of one scale only (each scale's hub cache holds its own CLIP).
        """
        return {
            "HF_HOME": os.fspath(self.hf_home),
            "HF_HUB_CACHE": os.fspath(self.hf_home / "hub"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }


def cache_dir() -> Path:
    """Where original-code checkpoints are built: $XCOMP_LAB_CACHE/original, else ~/.cache/xcomp-lab/original."""
    return Path(os.environ.get("XCOMP_LAB_CACHE", Path.home() / ".cache" / "xcomp-lab")) / "original"


def check_code_dir(code_dir: str | os.PathLike) -> Path:
    """`code_dir` as a Path if it holds the five remote-code files, else FileNotFoundError naming the missing ones."""
    folder = Path(code_dir)
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks the original remote-code file(s) {', '.join(missing)}; pass the folder of a downloaded "
            "internlm/internlm-xcomposer2-vl-7b checkpoint, or the reference copy "
            "(../shared/reference/internlm-xcomposer2-vl-7b beside the repository)."
        )
    return folder


def _build_key(code_dir: Path, scale: str, dtype: str, seed: int, shard_bytes: int) -> str:
    digest = hashlib.sha256(json.dumps([original_config(scale), clip_config(scale), dtype, seed, shard_bytes]).encode())
    for name in CODE_FILES:
        digest.update((code_dir / name).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:10]


def build_original_checkpoint(
    code_dir: str | os.PathLike,
    scale: str = "small",
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> OriginalCheckpoint:
    """Build (or reuse from the cache) a random-weight checkpoint that runs the remote code in `code_dir`.

    `dtype` is the storage dtype of the checkpoint and of CLIP in the hub cache (the released weights are FP16).
    The build is keyed by every argument but `code_dir`'s name, by the code files' contents and by this module, so
    changed code never reuses a stale build.
    """
    code = check_code_dir(code_dir)
    scale = check_original_scale(scale)
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("A checkpoint needs a concrete storage dtype ('float16', 'bfloat16' or 'float32'); "
                         "'auto' only makes sense when loading.")
    check_int("seed", seed, minimum=0, hint="the random weights' seed")
    check_int("shard_bytes", shard_bytes, minimum=1024**2, hint="bytes per safetensors shard")
    name = dtype_name(torch_dtype)
    key = _build_key(code, scale, name, seed, shard_bytes)
    built = OriginalCheckpoint(cache_dir() / f"{scale}-{name}-seed{seed}-{key}", scale)
    if _is_complete(built.root):
        return built
    built.root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(built.root.with_name(f".{built.root.name}.lock")):
        if _is_complete(built.root):
            return built
        staging = built.root.with_name(f"{built.root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            staged = OriginalCheckpoint(staging, scale)
            _write_checkpoint(staged, code, torch_dtype, seed, shard_bytes)
            _write_clip_cache(staged, torch_dtype, seed)
            write_manifest(
                staged.path,
                f"Delete the folder {built.root}; the next build_original_checkpoint({os.fspath(code)!r}, "
                f"{scale!r}, {name!r}, seed={seed}) builds it again.",
            )
            (staging / DONE_MARKER).write_text(json.dumps({"scale": scale, "dtype": name, "seed": seed,
                                                           "code_dir": os.fspath(code)}))
            os.replace(staging, built.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return built


def _is_complete(root: Path) -> bool:
    return (root / DONE_MARKER).is_file() and has_manifest(root / CHECKPOINT_NAME)


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Zeros for biases, ones for norm weights, else N(0, 0.02) seeded by (seed, name) as the original inits."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "weight" and "norm" in owner.rsplit(".", 1)[-1]:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * FULL_CONFIG["initializer_range"]


def _write_shards(directory: Path, shapes: dict[str, tuple[int, ...]], torch_dtype: torch.dtype, seed: int,
                  shard_bytes: int, stem: str) -> dict[str, str]:
    """Write `shapes` as random tensors in shards of at most `shard_bytes` (one tensor may exceed it)."""
    value_bytes = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = value_bytes * math.prod(shape)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards, start=1):
        filename = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _init_tensor(name, shapes[name], seed).to(torch_dtype) for name in names}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    return weight_map


def write_model_files(directory: str | os.PathLike, code_dir: str | os.PathLike, scale: str,
                      dtype: str | torch.dtype = "float16") -> Path:
    """Write everything of a checkpoint but its weights into `directory`: config.json, the code files copied from
    `code_dir`, tokenizer.model and the tokenizer's configs. What a model built directly on a device (random
    weights, no shards to read) needs to run the original's own code and tokenizer; returns the directory."""
    code = check_code_dir(code_dir)
    torch_dtype = check_dtype(dtype)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**original_config(scale), "torch_dtype": dtype_name(torch_dtype)}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(code / name, folder / name)
    (folder / "tokenizer.model").write_bytes(train_tokenizer_model(code, config["vocab_size"]))
    tokenizer_config = {
        "auto_map": TOKENIZER_AUTO_MAP,
        **SPECIAL_TOKENS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_length"],
        "tokenizer_class": "InternLMXComposer2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    return folder


def _write_checkpoint(built: OriginalCheckpoint, code: Path, torch_dtype: torch.dtype, seed: int,
                      shard_bytes: int) -> None:
    directory = built.path
    directory.mkdir(parents=True)
    write_model_files(directory, code, built.scale, torch_dtype)
    shapes = original_parameter_shapes(built.scale)
    weight_map = _write_shards(directory, shapes, torch_dtype, seed, shard_bytes, "model")
    value_bytes = torch.empty((), dtype=torch_dtype).element_size()
    total = value_bytes * sum(math.prod(shape) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_clip_cache(built: OriginalCheckpoint, torch_dtype: torch.dtype, seed: int) -> None:
    """The hub cache's models--openai--clip-vit-large-patch14-336 (refs/main, one snapshot), random weights."""
    config = clip_config(built.scale)
    hub = built.hf_home / "hub"
    repo = hub / f"models--{CLIP_REPO.replace('/', '--')}"
    revision = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (hub / "version.txt").write_text("1")  # the cache layout of transformers >= 4.22, which 4.33.2 checks for
    (snapshot / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vision = config["vision_config"]
    shapes = _clip_vision_shapes(vision, "vision_model.", vision["image_size"] // vision["patch_size"])
    _write_shards(snapshot, shapes, torch_dtype, seed + 1, 2**62, "model")


def chat_strings(code_dir: str | os.PathLike) -> list[str]:
    """The text the original's chat() builds around a query, read from its modeling code (system prompt included).

    The default `meta_instruction` of `chat()` is read with `ast` from modeling_internlm_xcomposer2.py, so the
    tokenizer is trained on the prompt the given code really sends.
    """
    path = check_code_dir(code_dir) / "modeling_internlm_xcomposer2.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name == "chat":
            arguments = node.args.args[-len(node.args.defaults):] if node.args.defaults else []
            for argument, default in zip(arguments, node.args.defaults):
                if argument.arg == "meta_instruction" and isinstance(default, ast.Constant):
                    system = default.value
                    return [
                        f"{IM_START}system\n{system}{IM_END}\n",
                        f"{IM_START}user\n<ImageHere>Describe the image in one sentence.{IM_END}\n",
                        f"{IM_START}user\nPlease describe this image in detail.{IM_END}\n{IM_START}assistant\n",
                    ]
    raise ValueError(f"{path} has no chat() with a string default for meta_instruction; is it the original "
                     "InternLM-XComposer2-VL modeling code?")


def train_tokenizer_model(code_dir: str | os.PathLike, vocab_size: int) -> bytes:
    """A sentencepiece BPE model (bytes of tokenizer.model) with exactly `vocab_size` pieces, trained deterministically.

    Ids as the original's: <unk> 0, <s> 1, </s> 2. The learned pieces come from the chat strings and the course's
    captions; `[UNUSED_TOKEN_0]`, `[UNUSED_TOKEN_1]`, ... fill the rest as user-defined pieces (so the chat's
    `[UNUSED_TOKEN_145]` and `[UNUSED_TOKEN_146]` are single pieces, as in the real tokenizer).
    """
    try:
        import sentencepiece as spm
    except ImportError:
        raise ImportError("Training tokenizer.model needs the sentencepiece package, which the course's .venv lacks: "
                          "build in the original's environment (make venv-original, then .venv-original/bin/python) "
                          "or pip install sentencepiece.") from None
    text = chat_strings(code_dir) * 4
    text += [" ".join(VOCABULARY)] * 4
    text += [caption(scene) for scene in make_scenes(200, seed=0)]

    def train(filler: int, limit: int, hard: bool) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=model, vocab_size=limit, hard_vocab_limit=hard,
            model_type="bpe", character_coverage=1.0, normalization_rule_name="identity", num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, byte_fallback=False,
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in range(filler)], minloglevel=2,
        )
        return model.getvalue()

    reserved = 147  # [UNUSED_TOKEN_0] .. [UNUSED_TOKEN_146], the chat's two among them
    learned = spm.SentencePieceProcessor(model_proto=train(reserved, vocab_size, hard=False)).get_piece_size()
    if learned > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the {learned} pieces the course's text needs; "
                         "pass a larger vocabulary.")
    model = train(reserved + vocab_size - learned, vocab_size, hard=True)
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if pieces != vocab_size:
        raise RuntimeError(f"sentencepiece trained {pieces} pieces, not the {vocab_size} asked for.")
    return model
