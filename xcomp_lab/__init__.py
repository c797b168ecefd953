"""xcomp-lab: run a large vision-language model within GPU memory, measured step by step.

The package, by role (each folder's own docstring says what it owns); a folder imports only from the rows
below it, never from a row above:

- `tools/`: command-line entry points only (the course run, the static site, the instructor guide, GPU runs,
  the benchmark, training, the sample scenes).
- `lessons/`: helpers that belong to one notebook, named after its lesson (precision, grad_modes, sequence,
  device_map, quantization, forensics, planner).
- `estimate/`: predicting a call's memory on fake tensors, per card for a device map, and device maps.
- `course/`: what every notebook shares: parameters, steps, notebook helpers, the results file, exercises, charts.
- `run/`: running the model: the one greedy generate call, batched captions, the measured call, speed.
- `memory/`: measuring (CUDA and CPU, one result schema), the one budget rule, weights' footprint, OOM survival.
- `model/`: the replica, its scales, tokenizer, checkpoints, loading and the parameter inventory.
- `data/`: synthetic scenes with true captions (and the shipped sample scenes), caption quality metrics.
- `core/`: units, dtypes, argument checks, JSON-lines files, package resources, the machine's description.
"""

__version__ = "0.1.0"
