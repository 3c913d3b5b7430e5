"""Text to `Query`: the lark LALR parser plus the checks the grammar cannot express.

The grammar (grammar/explaind.lark) only fixes the shape; this module binds `$name`
parameters, types and range-checks numbers and options, normalises (see `ast`), rejects
repeated clauses, and turns every lark exception into a one-line `QuerySyntaxError`
worded in the user's terms, so callers only ever see `QueryError`s:

- `QuerySyntaxError` for anything wrong with the text alone (grammar, duplicates, empty
  or negative ranges, bad option values, `with` outside evaluate);
- plain `QueryError` for parameter binding problems (missing `$name`, bad value);
- nothing run-dependent: unknown layers or out-of-range items are the semantic pass's.
"""

from __future__ import annotations

import difflib
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from explaind_ql.errors import QueryError, QuerySyntaxError
from explaind_ql.lang.ast import (
    AllItems, ComponentRef, Components, GroupBy, IndexList, IndexRange, Option, Options,
    Query, ScriptEntry, SplitSel, StepSel, Swap, Target, Top,
)

GRAMMAR_FILE = "explaind.lark"
ParamValue = Union[int, float, str]

# How terminals that stand for a class of text are shown (errors and completion).
_PLACEHOLDERS = {
    "NAME": "<name>", "PATH": "<layer or param name>", "VAR": "<$parameter>",
    "NUMBER": "<number>", "VALUE": "<value>", "STRING": "<string>",
}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH_RE = re.compile(r"[A-Za-z0-9_*]+(\.[A-Za-z0-9_*]+)*")
_INT_RE = re.compile(r"-?[0-9]{1,19}")
_FLOAT_RE = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,4})?")
_SIZE_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,9})?)([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_WORD_AT = re.compile(r"\$?[\w*]+(?:[.:][\w*]+)*|\.\.|\S")
_INT_LIMIT = 2**63


def grammar_path() -> Path:
    """The grammar file: package data when installed, else the repository's grammar/."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_grammar" / GRAMMAR_FILE, package.parent / "grammar" / GRAMMAR_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"query grammar {GRAMMAR_FILE} is missing from {package}/_grammar "
                            f"and {package.parent}/grammar; reinstall explaind_ql")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr",
                start=["query_text", "script"], propagate_positions=True, maybe_placeholders=True)


def _terminals(rule_name: str) -> tuple[str, ...]:
    """The terminals of one of the grammar's keyword-choice rules, in the grammar's order."""
    return tuple(sym.name for rule in _lark().rules if rule.origin.name == rule_name for sym in rule.expansion)


@lru_cache(maxsize=1)
def measure_keywords() -> frozenset[str]:
    """The terminals of the grammar's ``measure`` rule: a new measure's keyword is added there only."""
    return frozenset(_terminals("measure"))


@lru_cache(maxsize=1)
def target_functions() -> tuple[str, ...]:
    """What the grammar's ``target_fn`` rule allows before ``(``, as typed."""
    return tuple(name.lower() for name in _terminals("target_fn"))


@lru_cache(maxsize=1)
def _words() -> dict[str, str]:
    """Terminal name -> what the user types: keyword, punctuation or a <placeholder>."""
    words = {"$END": "end of query"}
    for term in _lark().terminals:
        if term.name in _PLACEHOLDERS:
            words[term.name] = _PLACEHOLDERS[term.name]
        elif isinstance(term.pattern, PatternStr):
            words[term.name] = term.pattern.value
        else:  # keyword terminals are named after their word
            words[term.name] = term.name.lower()
    return words


def _is_keyword(name: str) -> bool:
    return _words()[name] == name.lower()


def expected_tokens(prefix_text: str) -> set[str]:
    """What may come next after `prefix_text` (for REPL completion).

    Keywords and punctuation as typed, token classes as `<placeholders>` (`<number>`,
    `<name>`, ...). Pass the text up to the start of the word being completed; an
    invalid prefix gives the empty set.
    """
    interactive = _lark().parse_interactive(prefix_text, start="query_text")
    try:
        interactive.exhaust_lexer()
    except UnexpectedInput:
        return set()
    return {_words()[name] for name in interactive.accepts() if name != "$END"}


def parse(text: str, params: Mapping[str, ParamValue] | None = None) -> Query:
    """Parse one query (an optional trailing `;` is allowed); `params` binds `$name`s."""
    tree = _parse_tree(text, "query_text")
    return _Builder(text, dict(params or {})).query(tree.children[0])


def parse_script(text: str, params: Mapping[str, ParamValue] | None = None) -> list[ScriptEntry]:
    """Parse an .eql script: queries separated by `;`, `--` comments to end of line.

    `param $name = value;` declares a default for `$name` (valid for the whole script,
    wherever it is declared; declaring a name twice is an error). `params` from the
    caller override those defaults. A query may end in `as NAME` to name its result.
    Positions in the returned queries index into the whole script (`Query.text`).
    """
    tree = _parse_tree(text, "script")
    statements = [s for s in tree.children if s is not None]
    defaults: dict[str, ParamValue] = {}
    for decl in (s for s in statements if s.data == "param_decl"):
        var, value = decl.children[1], decl.children[2]
        if var[1:] in defaults:
            raise QuerySyntaxError(f"parameter {var} declared twice", text, var.start_pos)
        defaults[var[1:]] = _unquote(value) if value.type == "STRING" else str(value)
    builder = _Builder(text, {**defaults, **(params or {})})
    entries: list[ScriptEntry] = []
    names: set[str] = set()
    for stmt in (s for s in statements if s.data == "named_query"):
        query_tree, name = stmt.children[0], stmt.children[2]
        if name is not None:
            if str(name) in names:
                raise QuerySyntaxError(f"result name '{name}' given twice", text, name.start_pos)
            names.add(str(name))
        entries.append(ScriptEntry(
            query=builder.query(query_tree), name=None if name is None else str(name),
            source=text[query_tree.meta.start_pos:query_tree.meta.end_pos],
            pos=query_tree.meta.start_pos))
    return entries


# ---------------------------------------------------------------------------- errors

def _parse_tree(text: str, start: str) -> Tree:
    try:
        return _lark().parse(text, start=start)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, start) from None


def _accepts_at(e: UnexpectedInput, text: str, pos: int, start: str) -> set[str]:
    """Terminals acceptable at `pos`, before the offending token made the parser reduce.

    The exception's own parser state is taken after those reductions (LALR states are
    shared between contexts), so it can under-report: after `influence as` it would
    only offer `;`. Re-parsing the prefix gives the state the user sees. Should the
    prefix not lex on its own, the exception's state is the best remaining answer.
    """
    interactive = _lark().parse_interactive(text[:pos], start=start)
    try:
        interactive.exhaust_lexer()
    except UnexpectedInput:
        return e.interactive_parser.accepts()
    return interactive.accepts()


def _syntax_error(e: UnexpectedInput, text: str, start: str) -> QuerySyntaxError:
    words = _words()
    at_end = isinstance(e, UnexpectedToken) and e.token.type == "$END"
    pos = len(text.rstrip()) if at_end else e.pos_in_stream
    accepted = _accepts_at(e, text, pos, start)
    match = _WORD_AT.match(text, pos)
    found = "end of query" if at_end else f"'{_printable(match.group() if match else text[pos])}'"
    shown = {words[name] for name in accepted} - {"end of query", ";"} or {words[n] for n in accepted}
    expected = ("one of: " if len(shown) > 1 else "") + ", ".join(sorted(_quoted(word) for word in shown))
    hint = None
    # `on logits(test[0])`: a name before '(' that holds a selection is a target function the grammar lacks
    if found == "'('" and re.match(r"\(\s*[A-Za-z_$]", text[pos:]) and (
            fn := re.search(r"\bon\s+([A-Za-z_]\w*)\s*(\[[^\]]*\])?\s*$", text[:pos], re.I)):
        fns = target_functions()
        close = difflib.get_close_matches(fn.group(1).lower(), fns, 1)
        return QuerySyntaxError(f"unknown target function '{fn.group(1)}'; target functions are: {', '.join(fns)}",
                                text, fn.start(1), f"did you mean '{close[0]}'?" if close else None)
    if not at_end and match and match.group()[0].isalpha():
        word = match.group().lower()
        close = difflib.get_close_matches(word, sorted(words[n] for n in accepted if _is_keyword(n)), 1)
        hint = f"did you mean '{close[0]}'?" if close else None
        if accepted & measure_keywords() and word not in {words[n] for n in words if _is_keyword(n)}:
            return QuerySyntaxError(f"unknown measure {found}; expected {expected}", text, pos, hint)
        if {"LAYER", "PARAM"} <= set(accepted) and not hint:  # a component named without its kind
            hint = f"name a component by its kind: 'layer {match.group()}' or 'param {match.group()}'"
    return QuerySyntaxError(f"unexpected {found}; expected {expected}", text, pos, hint)


def _quoted(word: str) -> str:
    return word if word[0].isalpha() or word[0] == "<" else f"'{word}'"


def _printable(found: str) -> str:
    found = found[:40]
    return found if found.isprintable() else found.encode("unicode_escape").decode("ascii")


def _shown(value: ParamValue) -> str:
    """A value as a message shows it: repr, cut short; huge ints cannot even be repr'd."""
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        return "an integer over 2**63"
    return _printable(repr(value))


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), token[1:-1])


# ------------------------------------------------------------------------- options

def _opt_int(value: ParamValue) -> int:
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < _INT_LIMIT:
        return value
    raise ValueError("a positive integer")


def _opt_float(value: ParamValue) -> float:
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value):
        value = float(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _INT_LIMIT:
        return float(value)
    if isinstance(value, float) and 0 < value < math.inf:
        return value
    raise ValueError("a positive number such as 1e-6")


def _opt_device(value: ParamValue) -> str:
    if isinstance(value, str) and re.fullmatch(r"cpu|cuda(:[0-9]{1,3})?", value.lower()):
        return value.lower()
    raise ValueError("cpu, cuda or cuda:N")


def _opt_dtype(value: ParamValue) -> str:
    if isinstance(value, str) and value.lower() in ("float32", "float64"):
        return value.lower()
    raise ValueError("float32 or float64")


def _opt_size(value: ParamValue) -> int:
    if isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)) and m.group(2).lower() in _SIZE_UNITS:
        value = round(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < _INT_LIMIT:
        return value
    raise ValueError("a size such as 4GB, 512MiB or a number of bytes")


def _opt_string(value: ParamValue) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError("a non-empty string")


_OPTIONS: dict[str, Callable[[ParamValue], ParamValue]] = {
    "budget": _opt_size, "cluster": _opt_string, "device": _opt_device, "dtype": _opt_dtype,
    "quadrature": _opt_int, "threads": _opt_int, "tolerance": _opt_float,
}
_OPTION_SYNONYMS = {"nodes": "quadrature"}


# ------------------------------------------------------------------------- builder

class _Builder:
    """Turns lark trees into AST nodes, binding parameters and checking values."""

    def __init__(self, text: str, params: dict[str, ParamValue]):
        self.text = text
        self.params = params

    def fail(self, message: str, pos: int, hint: str | None = None) -> QuerySyntaxError:
        return QuerySyntaxError(message, self.text, pos, hint)

    def bad_value(self, token: Token, message: str) -> QueryError:
        """A bad value: a syntax error if written literally, a binding error if `$name`."""
        kind = QueryError if token.type == "VAR" else QuerySyntaxError
        return kind(message, self.text, token.start_pos)

    # -- leaves
    def param(self, var: Token) -> ParamValue:
        name = var[1:]
        if name not in self.params:
            raise QueryError(f"missing parameter {var}; pass {name}=...", self.text, var.start_pos)
        value = self.params[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise QueryError(f"parameter {var} must be an int, float or string, "
                             f"got {type(value).__name__}", self.text, var.start_pos)
        return value

    def integer(self, num: Tree, what: str, minimum: int = 0) -> int:
        token = num.children[0]
        raw = self.param(token) if token.type == "VAR" else str(token)
        value = raw
        if isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw):
            value = int(raw) if _INT_RE.fullmatch(raw) else _INT_LIMIT  # int() of 5000 digits raises
        if not isinstance(value, int):
            shown = f"{token} = {_shown(raw)}" if token.type == "VAR" else _shown(raw)
            raise self.bad_value(token, f"{what} must be an integer, got {shown}")
        if abs(value) >= _INT_LIMIT:
            raise self.bad_value(token, f"{what} is too large (the limit is 2**63 - 1)")
        if value < minimum:
            raise self.bad_value(token, f"negative {what} {value}" if minimum == 0
                                 else f"{what} must be at least {minimum}, got {value}")
        return value

    def name(self, token: Token, pattern: re.Pattern[str], what: str) -> str:
        if token.type != "VAR":
            return str(token)
        raw = self.param(token)
        value = raw if isinstance(raw, str) else _shown(raw)
        if not pattern.fullmatch(value):
            raise self.bad_value(token, f"parameter {token} = {_shown(raw)} is not a valid {what}")
        return value

    # -- query
    def query(self, tree: Tree) -> Query:
        explain_tree, measure_tree, *clauses = tree.children
        measure = measure_tree.children[0].type.lower()
        fields: dict[str, Any] = {}  # each clause's slot of Query, typed by its clause
        seen: dict[str, str] = {}
        for clause in clauses:
            keyword = clause.children[0]
            label = {"over_steps": "over steps", "at_step": "at step",
                     "at_steps": "at steps"}.get(clause.data, keyword.lower())
            slot, value = self.clause(clause, measure)
            if slot in seen:
                problem = "given twice" if seen[slot] == label else f"conflicts with '{seen[slot]}'"
                raise self.fail(f"clause '{label}' {problem}", keyword.start_pos)
            seen[slot] = label
            fields[slot] = value
        explain: Literal["plan", "analyze"] | None = None
        if explain_tree is not None:
            explain = "plan" if explain_tree.children[1] is None else "analyze"
        return Query(measure=measure, explain=explain, text=self.text, pos=tree.meta.start_pos, **fields)

    def clause(self, tree: Tree, measure: str) -> tuple[str, object]:
        kind, children, pos = tree.data, tree.children, tree.meta.start_pos
        if kind == "of_clause":
            return "components", self.components(children[1])
        if kind == "on_clause":
            return "target", self.target(children[1])
        if kind == "from_clause":
            return "train", self.split(children[1])
        if kind == "over_steps":
            return "steps", self.steps(children[2], pos)
        if kind == "at_step":
            step = self.integer(children[2], "step")
            return "steps", StepSel(step, step + 1, single=True, pos=pos)
        if kind == "at_steps":
            every = children[3]
            if every is not None and measure != "evaluate":
                raise self.fail("'every' in a steps clause is only valid for evaluate",
                                every.start_pos, "bin steps with 'by step every N'")
            every_n = None if every is None else self.integer(children[4], "step interval", 1)
            return "steps", self.steps(children[2], pos, every_n)
        if kind == "by_clause":
            return "by", self.group_by(children[1:], pos)
        if kind == "top_clause":
            return "top", Top(self.integer(children[1], "top count", 1), children[2] is not None, pos)
        if kind == "using_clause":
            return "options", self.options(children[1:], pos)
        # with_clause
        if measure != "evaluate":
            raise self.fail(f"'with' (taking components from another step) is only valid for "
                            f"evaluate, not {measure}", pos)
        return "swap", Swap(self.components(children[1]), self.integer(children[4], "step"), pos)

    # -- components
    def components(self, tree: Tree) -> Components:
        first, _, excluded = tree.children
        include = () if tree.data == "all_components" else self.component_list(first)
        exclude = () if excluded is None else self.component_list(excluded)
        return Components(include, exclude, tree.meta.start_pos)

    def component_list(self, tree: Tree) -> tuple[ComponentRef, ...]:
        refs = []
        for component in tree.children:
            kind, path = component.children
            refs.append(ComponentRef(kind.type.lower(), self.name(path, _PATH_RE, "layer or param name"),
                                     kind.start_pos))
        return tuple(refs)

    # -- items
    def target(self, tree: Tree) -> Target:
        pos = tree.meta.start_pos
        if tree.data == "label_target":
            return Target("label", self.split(tree.children[0]), None, pos)
        fn_tree, output_num, split_tree = tree.children
        fn = fn_tree.children[0].type.lower()
        if output_num is not None and fn != "output":
            raise self.fail(f"only output takes an output index, not {fn}", output_num.meta.start_pos,
                            "write output[7](test[0]) for one output")
        if fn == "output":
            if output_num is None:
                return Target("outputs", self.split(split_tree), None, pos)
            return Target("output", self.split(split_tree), self.integer(output_num, "output index"), pos)
        return Target(fn, self.split(split_tree), None, pos)

    def split(self, tree: Tree) -> SplitSel:
        name_token, index_tree, where_tree = tree.children
        split = self.name(name_token, _NAME_RE, "split name")
        index = self.index(index_tree) if index_tree is not None else AllItems(name_token.start_pos)
        labels = None
        if where_tree is not None:
            nums = [c for c in where_tree.children if isinstance(c, Tree)]
            labels = tuple(sorted({self.integer(n, "label") for n in nums}))
        return SplitSel(split, index, labels, tree.meta.start_pos)

    def index(self, tree: Tree) -> AllItems | IndexRange | IndexList:
        pos = tree.meta.start_pos
        if tree.data == "all_items":
            return AllItems(pos)
        items = [self.range(c, "index") if c.data != "num" else self.integer(c, "index")
                 for c in tree.children]
        if len(items) == 1 and isinstance(items[0], IndexRange):
            whole = items[0].start is None and items[0].stop is None
            return AllItems(pos) if whole else items[0]
        return IndexList(tuple(items), pos)

    def range(self, tree: Tree, what: str) -> IndexRange:
        """`a..b` (inclusive) or `a:b` (half-open, ends optional) as a half-open range."""
        start_num, stop_num = tree.children
        start = None if start_num is None else self.integer(start_num, what)
        stop = None if stop_num is None else self.integer(stop_num, what)
        if tree.data == "inclusive_range":
            assert start is not None and stop is not None  # the grammar gives '..' both ends
            if stop < start:
                raise self.fail(f"empty range {start}..{stop}", tree.meta.start_pos,
                                "'..' includes both ends: write the smaller bound first")
            stop += 1
        elif start is not None and stop is not None and stop <= start:
            raise self.fail(f"empty range {start}:{stop}", tree.meta.start_pos,
                            "':' excludes the end: write start:stop with start < stop")
        return IndexRange(start, stop, tree.meta.start_pos)

    def steps(self, tree: Tree, pos: int, every: int | None = None) -> StepSel:
        window = self.range(tree, "step")
        return StepSel(window.start, window.stop, every, False, pos)

    # -- shaping the result
    def group_by(self, dims: list[Tree], pos: int) -> GroupBy:
        names: list[str] = []
        step_every = None
        for dim in dims:
            token, every, every_num = dim.children
            name = token.type.lower()
            if name in names:
                raise self.fail(f"dimension '{name}' given twice", token.start_pos)
            if every is not None:
                if name != "step":
                    raise self.fail(f"'every' bins steps only, not {name}", every.start_pos,
                                    "write 'by step every N'")
                step_every = self.integer(every_num, "bin size", 1)
            names.append(name)
        return GroupBy(tuple(names), step_every, pos)

    def options(self, trees: list[Tree], pos: int) -> Options:
        options: dict[str, Option] = {}
        valid = sorted([*_OPTIONS, *_OPTION_SYNONYMS])
        for tree in trees:
            name_token, value_token = tree.children
            written = name_token.lower()
            name = _OPTION_SYNONYMS.get(written, written)
            if name not in _OPTIONS:
                close = difflib.get_close_matches(written, valid, 1)
                raise self.fail(f"unknown option '{name_token}'; valid options: {', '.join(valid)}",
                                name_token.start_pos, f"did you mean '{close[0]}'?" if close else None)
            if name in options:
                raise self.fail(f"option '{name}' given twice", name_token.start_pos)
            raw = {"VAR": self.param, "STRING": _unquote}.get(value_token.type, str)(value_token)
            try:
                value = _OPTIONS[name](raw)
            except ValueError as e:
                raise self.bad_value(value_token, f"{written} expects {e}, got {_shown(raw)}") from None
            options[name] = Option(name, value, name_token.start_pos)
        return Options(tuple(options[n] for n in sorted(options)), pos)
