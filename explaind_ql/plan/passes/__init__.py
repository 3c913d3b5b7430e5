"""The optimiser's passes, one module each; every pass is ``(Plan, Context) -> Plan``."""

from .aggregate import aggregate_tests
from .chunking import chunk_under_budget
from .distribute import distribute
from .pushdown import pushdown_restrictions
from .quadrature import choose_nodes
from .strategy import choose_strategy

__all__ = ["aggregate_tests", "choose_nodes", "choose_strategy", "chunk_under_budget", "distribute", "pushdown_restrictions"]
