"""Logical plan → optimisation passes → physical plan, and ``explain``.

A bound query first becomes a *logical* plan (:mod:`.logical`) that computes everything
(all params, all steps, all examples, every test item) and filters afterwards. The passes
of :data:`RULES` (:mod:`.passes`, one module each, every one ``(Plan, Context) -> Plan``:
sqlglot's optimizer's shape) then rewrite it in order; ``optimise(..., rules=...)`` runs
another sequence:

1. ``pushdown_restrictions`` moves the component, step and example filters into the
   engine request (gradients only for what is selected);
2. ``aggregate_tests`` sums the test items inside the target when no test axis is kept;
3. ``choose_nodes`` starts a smooth model's adaptive quadrature from 4 nodes per step;
4. ``choose_strategy`` picks ``delta`` / ``project`` / ``fold`` / ``momentum`` by estimated
   cost (:mod:`.cost`): the one place the strategy is decided;
5. ``chunk_under_budget`` splits the request so its working set fits the memory budget;
6. ``distribute``, with ``using cluster`` (or ``scheduler=``), splits the plan into step
   chunks for Dask workers; locally it changes nothing.

The result is the *physical* plan: an engine chunk tree plus the post-processing
(filter, top-k) that the frame needs. ``explain`` renders its node tree (:mod:`.explain`)
with each decision.
"""

from .cost import cheapest, estimate_costs, fmt_flops
from .explain import Node, render, tree
from .logical import grouping, logical
from .nodes import Context, Grouping, Plan
from .optimizer import RULES, WITHOUT_PUSHDOWN, Rule, optimise
from .passes import (aggregate_tests, choose_nodes, choose_strategy, chunk_under_budget, distribute,
                     pushdown_restrictions)

__all__ = ["RULES", "WITHOUT_PUSHDOWN", "Context", "Grouping", "Node", "Plan", "Rule", "aggregate_tests", "cheapest",
           "choose_nodes", "choose_strategy", "chunk_under_budget", "distribute", "estimate_costs", "fmt_flops", "grouping", "logical",
           "optimise", "pushdown_restrictions", "render", "tree"]
