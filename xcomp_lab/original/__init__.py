"""The course's steps run through the original model's own remote code, in the original's environment.

The released InternLM-XComposer2-VL-7B runs its own modeling code, written for transformers 4.33.2, which cannot
share the course's environment (transformers 5). These modules run in that second environment (`.venv-original`,
`make venv-original`; on a GPU machine the carried wheels of `xcomp_lab.tools.original_gpu_run`) and import
nothing of the course that needs transformers 5:

- `environment`: what must be in force before transformers 4.33.2 is imported (the checkpoint's hub cache,
  offline mode, a too new `tokenizers` hidden) and the versions that ran;
- `matmul`: on a CPU, FP16/BF16 matrix products computed in FP32 and rounded, so the low-precision steps run at
  FP32 speed while the tensor accounting sees exactly the same tensors;
- `quantize`: bitsandbytes for PLoRA layers (transformers' own replacement breaks them) and the skip-list
  alternative with what it costs;
- `steps`: every course step through `model.chat`, as the quick start calls it, measured by
  `xcomp_lab.memory.measure`, written as the course's results records;
- `autocast_cache`: the autocast weight-cache experiment (no_grad, inference_mode, cache_enabled=False) on any
  torch version.
- `estimate`: the estimator on the original code: `estimate_original(step, files)` replays the step's
  `model.chat` on fake tensors and predicts its peak (CUDA's caching allocator simulated), phase and OOM.
"""
