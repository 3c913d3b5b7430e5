"""Grammar-directed fuzzing of the whole pipeline (parse → bind → plan → engine → frame).

Queries are built from the grammar's pieces — every measure, `of` components with real,
globbed and unknown names, targets with good and bad function names, selections with
reversed, empty, out-of-range and duplicate ranges, every steps form, `by` dims, `top`,
`using` options, the evaluate swap — then sometimes mangled (junk tokens, a dropped
token, case changes, truncation). Each runs against a tiny recorded run and must either
give its result or raise an `ExplaindError` whose message is one line (the caret
rendering comes after it): never a raw exception. Half go through `explain` (parse,
bind, plan), half are executed to a frame.

Most queries are valid but for one planted fault (a random clause built from its pool of
faulty forms), so faults reach the semantic pass and the engine instead of hiding behind
an earlier error; the rest mix faults freely.
"""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import explaind_ql as eq
from explaind_ql.errors import ExplaindError, QueryError

STEPS = 12  # the run: toy transformer, 12 AdamW steps; train has 10 items, test 5
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PARAMS = {"s": "test", "layer": "emb", "x": 1}


@pytest.fixture(scope="module")
def run(toy_run):
    return eq.open(toy_run("transformer", "adamw", steps=STEPS))


# ---------------------------------------------------------------------------- pieces
#
# Every builder takes `mode`: "good" draws only valid forms, "bad" plants one fault,
# "mix" makes each piece faulty one time in MIX_ODDS.

MIX_ODDS = 5
SIZES = {"test": 5, "train": 10}


def one(*forms: str) -> st.SearchStrategy[str]:
    return st.sampled_from(forms)


def pick(draw, mode: str, good, bad):
    """`good` or `bad` (strategies) as `mode` says."""
    if mode == "mix":
        mode = "bad" if draw(st.integers(0, MIX_ODDS - 1)) == 0 else "good"
    return draw(bad if mode == "bad" else good)


def parts(draw, mode: str, names: list[str]) -> dict[str, str]:
    """Per sub-piece mode: with `mode` "bad", exactly one of `names` is bad."""
    if mode != "bad":
        return dict.fromkeys(names, mode)
    bad = draw(st.sampled_from(names))
    return {n: "bad" if n == bad else "good" for n in names}


far = one("13", "99", "1000000")  # past every split and the 12 steps


@st.composite
def good_ranges(draw, size: int) -> str:
    a = draw(st.integers(0, size - 1))
    b = draw(st.integers(a, size - 1))
    return draw(one(f"{a}..{b}", f"{a}:{b + 1}", f"{a}:", f":{b + 1}"))


@st.composite
def bad_ranges(draw, size: int) -> str:
    """Reversed (`4..3`), empty (`4:4`, `:0`) and out-of-range (`0..99`, `99:`) ranges."""
    a = draw(st.integers(1, size))
    return draw(one(f"{a}..{a - 1}", f"{a}:{a}", ":0", f"{a}:{a - 1}", f"0..{draw(far)}", f"{draw(far)}:",
                    f":{draw(far)}", f"{size}:", f"{size - 1}..{size}"))


@st.composite
def selections(draw, split: str, mode: str) -> str:
    size = SIZES[split]
    m = parts(draw, mode, ["name", "index", "index", "index", "where"])
    name = pick(draw, m["name"], one(split, split, "$s" if split == "test" else split),
                one("tset", "val", "TEST", {"test": "train", "train": "test"}[split], "$nope"))
    good_list = st.lists(st.one_of(st.integers(0, size - 1).map(str), good_ranges(size)), min_size=1, max_size=3,
                         unique=True).filter(lambda xs: _disjoint(xs, size)).map(lambda xs: f"[{', '.join(xs)}]")
    good_index = st.one_of(one("", "[*]", "[:]", "[0]", "[1, 3..4]"), good_ranges(size).map(lambda r: f"[{r}]"),
                           good_list)
    bad_index = st.one_of(
        one("[0, 0]", "[0..3, 2]", "[1:3, 0..1]", "[:0]", "[2, 2..3]", "[0:, 1]", f"[{size}]", "[-1]", "[1.5]",
            "[]", "[*, 1]"),
        bad_ranges(size).map(lambda r: f"[{r}]"),
        st.tuples(good_ranges(size), bad_ranges(size)).map(lambda rs: f"[{rs[0]}, {rs[1]}]"))
    index = pick(draw, m["index"], good_index, bad_index)
    where = pick(draw, m["where"], one("", "", "", " where label = 2", " where label in (0, 3)"),
                 one(" where label = 99", " where label in (98, 99)", " where label = -1", " where label 3"))
    return name + index + where


def _disjoint(items: list[str], size: int) -> bool:
    """Whether the written items and ranges pick no item twice."""
    picked: list[int] = []
    for it in items:
        if ".." in it:
            a, b = it.split("..")
            picked += range(int(a), int(b) + 1)
        elif ":" in it:
            a, b = it.split(":")
            picked += range(int(a or 0), int(b or size))
        else:
            picked.append(int(it))
    return len(picked) == len(set(picked))


@st.composite
def components(draw, mode: str) -> str:
    m = parts(draw, mode, ["ref", "except"])
    good_ref = one("layer emb", "layer attn", "layer linear*", "layer *", "param attn.W", "param linear1.bias",
                   "layer $layer", "param *.bias")
    bad_ref = one("layer embb", "param nope.x", "layer attn.W", "param emb", "layer", "layer $nope")
    refs = st.lists(good_ref, min_size=1, max_size=2).map(", ".join)
    head = draw(st.one_of(st.just("all"), refs)) if m["ref"] != "bad" else \
        draw(st.tuples(refs, bad_ref).map(", ".join))
    return head + pick(draw, m["except"], one("", "", " except layer emb", " except param attn.W"),
                       one(" except all", " except layer *", " except layer nope"))


@st.composite
def targets(draw, mode: str) -> str:
    m = parts(draw, mode, ["fn", "items", "items"])
    fn = pick(draw, m["fn"], one("", "", "label", "loss", "output", "output[3]", "logprob", "prob", "margin"),
              one("output[99]", "margn", "lossy", "loss[1]", "LOSS", "output[-1]", "label[0]"))
    items = draw(selections("test", m["items"]))
    return f"{fn}({items})" if fn else items


@st.composite
def steps_clauses(draw, measure: str, mode: str) -> str:
    good = [f"over steps {draw(good_ranges(12))}", f"at step {draw(st.integers(0, 11))}",
            f"at steps {draw(good_ranges(12))}"]
    if measure == "evaluate":
        good.append(f"at steps {draw(good_ranges(12))} every {draw(st.integers(1, 5))}")
    bad = [f"over steps {draw(bad_ranges(12))}", f"at steps {draw(bad_ranges(12))}",
           f"at step {draw(one('12', '13', '99', '-1'))}", "over steps 5", "at step",
           f"at steps {draw(good_ranges(12))} every {draw(st.integers(0, 5))}"]
    return pick(draw, mode, st.sampled_from(good), st.sampled_from(bad))


@st.composite
def by_clauses(draw, measure: str, mode: str) -> str:
    dims = ["example", "step", "layer", "param", "element", "test"] + (["output"] if measure == "influence" else [])
    chosen = draw(st.lists(st.sampled_from(dims), min_size=1, max_size=3, unique=True))
    m = parts(draw, mode, ["every", "tail"])
    every = pick(draw, m["every"], one("", "", " every 4"), one(" every 0", " every -1"))
    text = "by " + ", ".join(d + (every if d == "step" else "") for d in chosen)
    return text + pick(draw, m["tail"], st.just(""), one(", " + chosen[0], " every 3", ",", ", output"))


OPTIONS = ["tolerance 1e-3", "tolerance 1e-6", "quadrature 1", "quadrature 2", "nodes 3", "dtype float32",
           "dtype float64", "device cpu", "budget 4GB"]
BAD_OPTIONS = ["dtype float46", "device gpu", "device cuda", "quad 3", "budget 4XB", "budget 1KB",
               "quadrature 65", "tolerance 0", "nodes 2, quadrature 3", "tolerance 1e-3, quadrature 2",
               "device $x"]  # no `cluster`: the fuzzer would dial whatever address it wrote


@st.composite
def using_clauses(draw, mode: str) -> str:
    good = st.lists(st.sampled_from(OPTIONS), min_size=1, max_size=3,  # nodes = quadrature, which excludes tolerance
                    unique_by=lambda o: "quadrature" if o.split()[0] in ("nodes", "tolerance") else o.split()[0])
    options = draw(good)
    if mode == "bad" or (mode == "mix" and draw(st.integers(0, MIX_ODDS - 1)) == 0):
        options.insert(draw(st.integers(0, len(options))), draw(st.sampled_from(BAD_OPTIONS)))
    return "using " + ", ".join(options)


# Clauses each measure takes (docs/language.md); any other is a fault to plant.
TAKES = {"influence": {"of", "on", "from", "steps", "by", "top", "using"},
         "kernel": {"of", "on", "from", "steps", "by", "top", "using"},
         "check": {"on", "steps", "using"},
         "similarity": {"of", "on", "steps", "using"},
         "evaluate": {"on", "steps", "using", "with"}}
CLAUSES = ("of", "on", "from", "steps", "by", "top", "using", "with")


@st.composite
def queries(draw) -> str:
    measure = draw(one("influence", "influence", "kernel", "check", "similarity", "evaluate"))
    takes = TAKES[measure]
    planted = draw(one("free", "none", "none", "clause", *sorted(takes)))  # one faulty clause, none, or any
    if planted == "clause":  # a clause the measure does not take
        planted = draw(st.sampled_from(sorted(set(CLAUSES) - takes)))
        takes = takes | {planted}
    pool = sorted(takes if planted != "free" else set(CLAUSES) - ({"with"} - takes))  # `with`: a syntax error
    chosen = set(draw(st.lists(st.sampled_from(pool), max_size=4, unique=True)))
    if planted not in ("free", "none"):
        chosen.add(planted)

    def mode(clause: str) -> str:
        return "mix" if planted == "free" else "bad" if clause == planted and clause in TAKES[measure] \
            else "good"

    builders = {
        "of": lambda m: f"of {draw(components(m))}",
        "on": lambda m: f"on {draw(targets(m))}",
        "from": lambda m: f"from {draw(selections('train', m))}",
        "steps": lambda m: draw(steps_clauses(measure, m)),
        "by": lambda m: draw(by_clauses(measure, m)),
        "top": lambda m: "top " + pick(draw, m, st.integers(1, 20).map(str), one("0", "-3", "2.5", "$nope"))
                         + draw(one("", " abs")),
        "using": lambda m: draw(using_clauses(m)),
        "with": lambda m: f"with {draw(components(m))} from step "
                          + pick(draw, m, st.integers(0, 12).map(str), far),
    }
    texts = [builders[c](mode(c)) for c in sorted(chosen)]
    explain = draw(one("", "", "", "explain ", "explain analyze "))
    return explain + " ".join([measure, *draw(st.permutations(texts))])


JUNK = ["of", "on", "by", "from", "top", "[", "]", "(", ")", "..", ":", ",", ";", "*", "-1", "1.5", "$x",
        "\n", "--", '"', "é", "\x00", "9" * 30, "where", "label", "=", "every", "abs", "using", "with",
        "layer", "step", "steps", "as", "explain"]


@st.composite
def mangled(draw) -> str:
    """A grammar-built query; one time in five with junk inserted, a token dropped, case changed or cut short."""
    text = draw(queries())
    if draw(st.integers(0, 4)):
        return text
    for op in draw(st.lists(one("junk", "junk", "drop", "upper", "swapcase", "cut"), min_size=1, max_size=2)):
        tokens = text.split(" ")
        i = draw(st.integers(1, len(tokens)))  # not before the measure: that only ever says "unknown measure"
        if op == "junk":
            tokens.insert(i, draw(st.sampled_from(JUNK)))
        elif op == "drop" and i < len(tokens):
            del tokens[i]
        elif op in ("upper", "swapcase") and i < len(tokens):
            tokens[i] = getattr(tokens[i], op)()
        text = " ".join(tokens)
        if op == "cut":
            text = text[:draw(st.integers(0, len(text)))]
    return text


def assert_one_line(err: ExplaindError, text: str) -> None:
    """One line of message (and hint); a located error adds the source line and the caret."""
    if isinstance(err, QueryError):
        assert 0 <= err.pos <= len(text)
        assert "\n" not in err.message and "\n" not in (err.hint or ""), repr(err.message)
        lines = str(err).split("\n")
        assert len(lines) == (3 if err.text else 1), str(err)
        if err.text:
            assert lines[2].strip() == "^", str(err)
    else:
        assert "\n" not in str(err), str(err)
    assert str(err).strip()


# ---------------------------------------------------------------------------- the property

@FUZZ
@given(text=mangled(), execute=st.booleans())
def test_fuzz_queries_give_a_result_or_an_explaind_error(run, text, execute):
    try:
        if execute:  # a tiny run: milliseconds a query
            assert isinstance(run.query(text, **PARAMS), pl.DataFrame)
        else:
            assert isinstance(run.explain(text, **PARAMS), str)
    except ExplaindError as err:
        assert_one_line(err, text)
