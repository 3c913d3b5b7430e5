"""The query language: grammar-backed parser, typed AST and canonical unparser.

Everything downstream (semantic check, planner, REPL) imports from here, so the lark
grammar stays an implementation detail of `parser`.
"""

from explaind_ql.lang.ast import (
    AllItems, ComponentRef, Components, GroupBy, IndexList, IndexRange, Option, Options,
    Query, ScriptEntry, SplitSel, StepSel, Swap, Target, Top, unparse,
)
from explaind_ql.lang.parser import expected_tokens, grammar_path, parse, parse_script

__all__ = [
    "AllItems", "ComponentRef", "Components", "GroupBy", "IndexList", "IndexRange", "Option",
    "Options", "Query", "ScriptEntry", "SplitSel", "StepSel", "Swap", "Target", "Top",
    "expected_tokens", "grammar_path", "parse", "parse_script", "unparse",
]
