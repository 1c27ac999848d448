"""Coarse-grained selection of the subset S (problem 19): cost models, profiles, the loss oracle,
SMO (Algorithm 2) and its baselines, and live re-selection. See docs/selection.md."""

from moe2.selection.base import AllLive, SubsetSelector
from moe2.selection.costs import Application, Budgets, Constraints, CostTable, ExpertCost
from moe2.selection.oracle import LossOracle
from moe2.selection.problem import Infeasible, Problem, Solution
from moe2.selection.profiles import Profiles, load_profiles
from moe2.selection.smo import brute_force, greedy, random_subset, smo

__all__ = [
    "AllLive",
    "Application",
    "Budgets",
    "Constraints",
    "CostTable",
    "ExpertCost",
    "Infeasible",
    "LossOracle",
    "Problem",
    "Profiles",
    "Solution",
    "SubsetSelector",
    "brute_force",
    "greedy",
    "load_profiles",
    "random_subset",
    "smo",
]
