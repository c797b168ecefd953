"""xcomp-lab: run a large vision-language model within GPU memory, measured step by step."""

__version__ = "0.1.0"
