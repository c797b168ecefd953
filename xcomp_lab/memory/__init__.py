"""Memory measurement, budgets and OOM handling with one result schema on CUDA and CPU."""

from xcomp_lab.memory.budget import Budget, BudgetExceededError
from xcomp_lab.memory.measure import MemoryResult, measure
from xcomp_lab.memory.oom import GuardedResult, run_guarded

__all__ = ["measure", "MemoryResult", "Budget", "BudgetExceededError", "run_guarded", "GuardedResult"]
