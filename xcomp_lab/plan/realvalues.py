"""Where a model's code reads data, keep the data real: the small integer tensors stay real tensors.

The replay runs a model's own code and `generate` itself on fake tensors, which have shapes but no values. Code
that reads values cannot run on them: `generate`'s stopping checks (`unfinished_sequences.max() == 0`), the mask
builders' "is there padding?" (`padding_mask.all()`, and transformers skips the causal mask for sdpa only when it
can read that), Qwen2-VL's 3-D rope index (`.tolist()` of the image grid, loops over each image's tokens),
the image-token scatter and its count check, Idefics3's "which tiles are padding" over the pixels.

All of it reads the real inputs (token ids, attention mask, grids, pixels) and what is computed from them, never
the weights. So the inputs stay real tensors, and `RealValues` runs every op whose tensor arguments are all real
on real data, outside the fake mode; an op that touches a fake tensor stays fake. One exception keeps the real
work small: an op that makes a large output many times larger than its real arguments (the eager causal mask,
batch x length^2, broadcast from position vectors; its values are only ever added to scores, never read) is
answered fake, from its shape, unless only its values can answer it (an op of data-dependent output, such as
`nonzero` or `.item()`). Ops whose outputs are of the size of their inputs (the pixels, the growing token ids)
run for real.

The one value the model itself produces and `generate` reads is the next token: `argmax` over fake logits is
answered by a real tensor holding one ordinary token id (`token`), never an end-of-sequence token, as
`min_new_tokens` guarantees for the real call. The memory of every op is the same as in the real call: the same
ops run on tensors of the same shapes, and the accounting counts real and fake storages alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

SMALL_VALUES = 1 << 16  # elements: an op may make a real output this large from any inputs
BROADCAST = 4  # beyond that, an output this many times larger than its real inputs is made fake
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)
_ARGMAX = torch.ops.aten.argmax.default


class RealValues(TorchDispatchMode):
    """Run ops on real arguments for real (unless a large output comes from small inputs); `argmax` gives `token`.

    Push it inside a `FakeTensorMode(allow_non_fake_inputs=True)`, so that the ops it does not run for real reach
    the fake mode.
    """

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            out = func(*args, **kwargs)
            if func is _ARGMAX:
                with _disable_current_modes():
                    return torch.full(out.shape, self.token, dtype=out.dtype)
            return out
        try:
            out = func(*args, **kwargs)  # fake: its shape says whether a real run would stay small
        except _DATA_DEPENDENT:
            return self._real(func, args, kwargs)
        made = sum(o.numel() for o in tree_leaves(out) if isinstance(o, torch.Tensor))
        if made > SMALL_VALUES and made > BROADCAST * sum(t.numel() for t in tensors):
            return out
        return self._real(func, args, kwargs)

    @staticmethod
    def _real(func: Any, args: tuple, kwargs: dict) -> Any:
        with _disable_current_modes():
            return func(*args, **kwargs)
