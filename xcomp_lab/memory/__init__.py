"""Memory: measurement with one result schema on CUDA and CPU, budgets (the one budget rule and the card
constants), the weights' footprint (the one bitsandbytes statistics rule) and surviving an OOM."""

from xcomp_lab.memory.budget import Budget, BudgetExceededError
from xcomp_lab.memory.measure import MemoryResult, measure
from xcomp_lab.memory.oom import GuardedResult, run_guarded

__all__ = ["measure", "MemoryResult", "Budget", "BudgetExceededError", "run_guarded", "GuardedResult"]
