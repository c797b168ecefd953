"""Which of bitsandbytes' two 4-bit CPU paths a model takes, chosen on purpose instead of by the CPU.

bitsandbytes 0.50 multiplies a 4-bit weight on a CPU in one of two ways, picked by the processor:

- **portable** (every CPU): dequantize the weight to the compute dtype for each call, then an ordinary product.
- **packed** (CPUs with AVX512-BF16: current Xeons, Zen 4 and later): on the first call each `Linear4bit`
  repacks its weight into tiles of 32 output rows, turns its statistics into one BF16 absmax per block, and
  from then on multiplies in BF16 with a fused kernel. The repacking asserts that the layer has a multiple
  of 32 outputs and whole 64-value blocks per row; a layer that does not (the tiny replica's rank-16 PLoRA
  branches) crashes with `AssertionError: N must be divisible by block_n`.

The two paths give different numbers (BF16 against FP16 products, BF16 statistics), so the course pins one:
`XCOMP_LAB_BNB_CPU_PATH` = "portable" (the default: every laptop in a workshop prints the same figures),
"packed" (the packed path on every layer whose shape it accepts, on any CPU; where the CPU lacks AVX512-BF16
its fused kernel is replaced by a PyTorch equivalent, so the path can be tested anywhere) or "auto"
(bitsandbytes' own choice for this CPU, minus the layers whose shape the packed path rejects).
`apply_cpu_path()` is called by `load_model()` on every 4-bit model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

ENV_VAR = "XCOMP_LAB_BNB_CPU_PATH"
CPU_PATHS = ("portable", "packed", "auto")
DEFAULT_CPU_PATH = "portable"
PACKED_BLOCK_ROWS = 32  # bitsandbytes' packed CPU format interleaves this many output rows
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size (one absmax per 64 values)

# On an AVX512-BF16 CPU, importing bitsandbytes tries to fetch a faster kernel from the Hugging Face hub and
# logs a warning when it cannot (the course runs offline): its own kernel is used instead. The warning would
# print in whichever notebook cell first loads a quantized model, on those CPUs only.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_emulation_library: torch.library.Library | None = None


def check_cpu_path(path: str) -> str:
    """Return `path` if it is one of CPU_PATHS, else raise a ValueError saying what each means."""
    if path not in CPU_PATHS:
        raise ValueError(
            f"bitsandbytes CPU path {path!r} is not one of {list(CPU_PATHS)}: 'portable' dequantizes on every CPU "
            "(the course's default), 'packed' forces the AVX512-BF16 format, 'auto' lets bitsandbytes pick by CPU. "
            f"Set {ENV_VAR} to one of them or unset it."
        )
    return path


def cpu_path_from_env() -> str:
    """The path `XCOMP_LAB_BNB_CPU_PATH` asks for, the course's default when it is unset or empty."""
    return check_cpu_path(os.environ.get(ENV_VAR) or DEFAULT_CPU_PATH)


def cpu_has_avx512bf16() -> bool:
    """bitsandbytes' own test of this CPU: True where it would take the packed path by itself."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def packed_format_accepts(in_features: int, out_features: int, blocksize: int = NF4_BLOCKSIZE) -> bool:
    """Whether bitsandbytes' packed CPU format can hold an (out_features, in_features) 4-bit weight."""
    return out_features % PACKED_BLOCK_ROWS == 0 and in_features % blocksize == 0


def _blocksize(module: nn.Module) -> int:
    quant_state = getattr(module.weight, "quant_state", None)
    return getattr(quant_state, "blocksize", None) or getattr(module.weight, "blocksize", NF4_BLOCKSIZE)


@dataclass(frozen=True)
class CpuPathChoice:
    """What `apply_cpu_path` set: how many 4-bit layers take each path, and why."""

    path: str  # the path asked for
    packed: tuple[str, ...]  # layers that repack on their first CPU call
    portable: tuple[str, ...]  # layers that dequantize on every call
    rejected_by_shape: tuple[str, ...]  # portable because the packed format cannot hold their shape
    emulated: bool  # the packed kernel is PyTorch code, because this CPU lacks AVX512-BF16

    def __str__(self) -> str:
        if not self.packed and not self.portable:
            return "no 4-bit layers"
        kernel = " (kernel emulated in PyTorch: this CPU lacks AVX512-BF16)" if self.emulated else ""
        shape = (f"; {len(self.rejected_by_shape)} kept portable because the packed format needs a multiple of "
                 f"{PACKED_BLOCK_ROWS} outputs and whole blocks per row") if self.rejected_by_shape else ""
        return (f"bitsandbytes CPU path '{self.path}': {len(self.packed)} 4-bit layers packed{kernel}, "
                f"{len(self.portable)} portable{shape}")


def apply_cpu_path(model: nn.Module, path: str | None = None) -> CpuPathChoice:
    """Set, on every `Linear4bit` of `model`, which CPU path its next call takes (before its first call).

    `path` None reads `XCOMP_LAB_BNB_CPU_PATH`. Asking again for the same path is harmless; a layer already
    repacked by an earlier call cannot go back to the portable path.
    """
    path = cpu_path_from_env() if path is None else check_cpu_path(path)
    from bitsandbytes.nn import Linear4bit

    want_packed = path == "packed" or (path == "auto" and cpu_has_avx512bf16())
    packed, portable, rejected = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        fits = packed_format_accepts(module.in_features, module.out_features, _blocksize(module))
        already_packed = getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)
        if already_packed and not (want_packed and fits):
            raise ValueError(f"{name} was already repacked for the CPU by an earlier call: choose the path right "
                             "after loading, before the first forward pass.")
        module.support_avx512bf16_for_cpu = want_packed and fits
        (packed if module.support_avx512bf16_for_cpu else portable).append(name)
        if want_packed and not fits:
            rejected.append(name)
    emulated = bool(packed) and not cpu_has_avx512bf16()
    if emulated:
        register_packed_kernel_emulation()
    return CpuPathChoice(path, tuple(packed), tuple(portable), tuple(rejected), emulated)


def unpack_packed_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (out, in) 4-bit codes of a weight in bitsandbytes' packed CPU format.

    The format stores, for each tile of 32 output rows and each pair of input columns, 32 bytes: the low
    nibbles hold rows 0-15 of the tile, the high nibbles rows 16-31, each row's two columns side by side.
    """
    tiles = out_features // PACKED_BLOCK_ROWS
    flat = packed.reshape(tiles, in_features // 2, PACKED_BLOCK_ROWS)  # (tile, column pair, byte)
    codes = torch.cat([flat & 0xF, flat >> 4], dim=-1)  # (tile, column pair, half * 32 + row * 2 + column)
    codes = codes.reshape(tiles, in_features // 2, 2, PACKED_BLOCK_ROWS // 2, 2)  # (tile, pair, half, row, col)
    return codes.permute(0, 2, 3, 1, 4).reshape(out_features, in_features)


def packed_gemv_reference(A: torch.Tensor, B: torch.Tensor, shapeB: list[int], absmax: torch.Tensor,
                          code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """What bitsandbytes' fused packed kernel computes: BF16 weights from codes and BF16 absmax, FP32 sums."""
    out_features, in_features = shapeB[0], shapeB[1]
    codes = unpack_packed_codes(B.view(torch.uint8), out_features, in_features)  # (N, K)
    scale = absmax.float().t().repeat_interleave(blocksize, dim=1)  # (N, K): absmax is stored (K / block, N)
    weight = (code.float()[codes.long()] * scale).to(torch.bfloat16)  # (N, K)
    rows = A.reshape(-1, A.shape[-1]).to(torch.bfloat16)  # (M, K)
    out = (rows.float() @ weight.float().t()).to(torch.bfloat16)  # (M, N)
    return out.to(A.dtype).reshape(*A.shape[:-1], out_features)


def register_packed_kernel_emulation() -> None:
    """Serve bitsandbytes' packed CPU kernel with `packed_gemv_reference` in this process (once).

    Only for CPUs without AVX512-BF16, where bitsandbytes registers no kernel for the packed format.
    """
    global _emulation_library
    if _emulation_library is not None:
        return
    if cpu_has_avx512bf16():
        raise RuntimeError("this CPU has AVX512-BF16: bitsandbytes' own packed kernel is in place, keep it.")
    import bitsandbytes  # noqa: F401  (defines the bitsandbytes:: operators)

    library = torch.library.Library("bitsandbytes", "IMPL")
    torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", packed_gemv_reference, lib=library)
    _emulation_library = library
