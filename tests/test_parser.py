"""Parser tests: every clause form, every documented error (with caret position),
scripts, completion, and hypothesis fuzzing for "only QueryError, ever" and round-trip."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explaind_ql.errors import QueryError, QuerySyntaxError
from explaind_ql.lang import (
    AllItems, ComponentRef, Components, GroupBy, IndexList, IndexRange, Option, Options, Query,
    SplitSel, StepSel, Swap, Target, Top, expected_tokens, grammar_path, parse, parse_script,
    unparse,
)
from explaind_ql.lang import parser as parser_module

EXAMPLE = "influence of layer emb on test[0..9] over steps 1000:5000 by example"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def sel(split: str, index=None, where=None) -> SplitSel:
    return SplitSel(split, AllItems() if index is None else index, where)


def layer(name: str) -> ComponentRef:
    return ComponentRef("layer", name)


def param(name: str) -> ComponentRef:
    return ComponentRef("param", name)


def error(text: str, params=None, kind=QueryError) -> QueryError:
    with pytest.raises(kind) as info:
        parse(text, params)
    return info.value


def assert_caret_at(err: QueryError, token: str) -> None:
    """The rendered caret sits under `token` in the rendered source line."""
    *_, source, caret = err.render().splitlines()
    column = caret.index("^") - 2
    assert source[2:][column:].startswith(token), (err.render(), token)


# ------------------------------------------------------------------ the fixed point

def test_verbatim_example_means_what_it_says():
    q = parse(EXAMPLE)
    assert q.measure == "influence"
    assert q.components == Components((layer("emb"),), ())
    assert q.target == Target("label", SplitSel("test", IndexRange(0, 10)))
    assert q.steps == StepSel(1000, 5000)
    assert q.by == GroupBy(("example",))
    assert (q.train, q.top, q.options, q.swap, q.explain) == (None, None, None, None, None)
    assert q.text == EXAMPLE and q.pos == 0
    assert q.components.include[0].pos == EXAMPLE.index("layer")
    assert q.target.items.index.pos == EXAMPLE.index("0..9")
    assert q.steps.pos == EXAMPLE.index("over")


def test_clauses_in_any_order_trailing_semicolon_comments_and_case():
    shuffled = "INFLUENCE By example Over Steps 1000:5000 -- window\n ON test[0..9] of LAYER emb;"
    assert parse(shuffled) == parse(EXAMPLE)


def test_equality_ignores_positions_and_text():
    assert parse("influence   of layer emb") == parse("influence of layer emb")


# ------------------------------------------------------------------ measures, explain

@pytest.mark.parametrize("measure", ["influence", "check", "kernel", "similarity", "evaluate"])
def test_measures(measure):
    assert parse(measure) == Query(measure)


@pytest.mark.parametrize("text, explain", [
    ("influence", None), ("explain influence", "plan"), ("explain analyze influence", "analyze"),
])
def test_explain(text, explain):
    assert parse(text).explain == explain


# ------------------------------------------------------------------ components

@pytest.mark.parametrize("text, components", [
    ("layer emb", Components((layer("emb"),))),
    ("param emb.weight", Components((param("emb.weight"),))),
    ("layer blocks.*.attn", Components((layer("blocks.*.attn"),))),
    ("layer layers.0.mlp", Components((layer("layers.0.mlp"),))),
    ("param 0.weight", Components((param("0.weight"),))),
    ("layer step", Components((layer("step"),))),
    ("layer emb, layer unembed, param head.bias",
     Components((layer("emb"), layer("unembed"), param("head.bias")))),
    ("all", Components(())),
    ("all except layer emb", Components((), (layer("emb"),))),
    ("layer blocks.* except param blocks.0.bias",
     Components((layer("blocks.*"),), (param("blocks.0.bias"),))),
])
def test_components(text, components):
    assert parse(f"influence of {text}").components == components


# ------------------------------------------------------------------ targets and items

@pytest.mark.parametrize("text, target", [
    ("test[0..9]", Target("label", sel("test", IndexRange(0, 10)))),
    ("label(test[0..9])", Target("label", sel("test", IndexRange(0, 10)))),
    ("loss(test[0..9])", Target("loss", sel("test", IndexRange(0, 10)))),
    ("output(test[0])", Target("outputs", sel("test", IndexList((0,))))),
    ("output[7](test[0])", Target("output", sel("test", IndexList((0,))), 7)),
    ("logprob(test[1])", Target("logprob", sel("test", IndexList((1,))))),
    ("prob(test[1])", Target("prob", sel("test", IndexList((1,))))),
    ("margin(test[1])", Target("margin", sel("test", IndexList((1,))))),
    ("label(loss[2])", Target("label", sel("loss", IndexList((2,))))),
])
def test_targets(text, target):
    assert parse(f"influence on {text}").target == target


@pytest.mark.parametrize("text, selection", [
    ("test[3]", sel("test", IndexList((3,)))),
    ("test[0..9]", sel("test", IndexRange(0, 10))),
    ("test[3..3]", sel("test", IndexRange(3, 4))),
    ("test[0:10]", sel("test", IndexRange(0, 10))),
    ("test[5:]", sel("test", IndexRange(5, None))),
    ("test[:5]", sel("test", IndexRange(None, 5))),
    ("test[1, 5, 9]", sel("test", IndexList((1, 5, 9)))),
    ("test[1, 3..5, 8:10]", sel("test", IndexList((1, IndexRange(3, 6), IndexRange(8, 10))))),
    ("test[*]", sel("test")),
    ("test[:]", sel("test")),
    ("test", sel("test")),
    ("holdout_2[0]", sel("holdout_2", IndexList((0,)))),
    ("test where label = 3", sel("test", where=(3,))),
    ("test[0..99] where label = 3", sel("test", IndexRange(0, 100), (3,))),
    ("test where label in (2, 1, 2)", sel("test", where=(1, 2))),
])
def test_split_selections(text, selection):
    assert parse(f"influence on {text}").target.items == selection


@pytest.mark.parametrize("text, selection", [
    ("train[0..99]", sel("train", IndexRange(0, 100))),
    ("train where label = 3", sel("train", where=(3,))),
    ("val[*]", sel("val")),
])
def test_from(text, selection):
    assert parse(f"influence from {text}").train == selection


# ------------------------------------------------------------------ steps

@pytest.mark.parametrize("text, steps", [
    ("over steps 1000:5000", StepSel(1000, 5000)),
    ("over steps 1000:", StepSel(1000, None)),
    ("over steps :500", StepSel(None, 500)),
    ("over steps 10..20", StepSel(10, 21)),
    ("at step 500", StepSel(500, 501, single=True)),
    ("at steps 0:100", StepSel(0, 100)),
])
def test_steps(text, steps):
    assert parse(f"influence {text}").steps == steps


def test_evaluate_swap():
    q = parse("evaluate on test[*] at steps 0:1940 every 10 with layer emb, layer unembed from step 1939")
    assert q.measure == "evaluate"
    assert q.target == Target("label", sel("test"))
    assert q.steps == StepSel(0, 1940, every=10)
    assert q.swap == Swap(Components((layer("emb"), layer("unembed"))), 1939)
    assert parse("evaluate at step 7").steps == StepSel(7, 8, single=True)


# ------------------------------------------------------------------ by, top, using

@pytest.mark.parametrize("text, by", [
    ("by example", GroupBy(("example",))),
    ("by layer, step", GroupBy(("layer", "step"))),
    ("by step every 100", GroupBy(("step",), 100)),
    ("by test, step every 10, output", GroupBy(("test", "step", "output"), 10)),
    ("by param, element", GroupBy(("param", "element"))),
])
def test_by(text, by):
    assert parse(f"influence {text}").by == by


@pytest.mark.parametrize("text, top", [("top 10", Top(10)), ("top 10 abs", Top(10, True))])
def test_top(text, top):
    assert parse(f"influence {text}").top == top


@pytest.mark.parametrize("text, name, value", [
    ("quadrature 5", "quadrature", 5),
    ("nodes 5", "quadrature", 5),
    ("tolerance 1e-6", "tolerance", 1e-6),
    ("tolerance 0.5", "tolerance", 0.5),
    ("device cuda", "device", "cuda"),
    ("device cpu", "device", "cpu"),
    ("device cuda:1", "device", "cuda:1"),
    ("dtype float32", "dtype", "float32"),
    ("dtype float64", "dtype", "float64"),
    ("budget 4GB", "budget", 4 * 10**9),
    ("budget 512B", "budget", 512),
    ("budget 2KB", "budget", 2000),
    ("budget 3MB", "budget", 3 * 10**6),
    ("budget 1KiB", "budget", 1024),
    ("budget 2MiB", "budget", 2 * 2**20),
    ("budget 1.5GiB", "budget", 3 * 2**29),
    ("budget 1000", "budget", 1000),
    ('cluster "tcp://host:8786"', "cluster", "tcp://host:8786"),
    (r'cluster "say \"hi\""', "cluster", 'say "hi"'),
])
def test_options(text, name, value):
    options = parse(f"influence using {text}").options
    assert options.as_dict() == {name: value}
    assert options.get(name) == value and options.get("other", 3) == 3


def test_options_are_sorted_and_order_free():
    q = parse("influence using tolerance 1e-3, budget 1GB, quadrature 3")
    assert [o.name for o in q.options.items] == ["budget", "quadrature", "tolerance"]
    assert q == parse("influence using quadrature 3, budget 1GB, tolerance 1e-3")
    assert q.options == Options((Option("budget", 10**9), Option("quadrature", 3), Option("tolerance", 1e-3)))


# ------------------------------------------------------------------ parameters

def test_parameters_bind_everywhere():
    text = ("influence of layer $layer on output[$o]($split[$i, $a..$b]) from train where label = $l "
            "over steps $s:$e by step every $n top $k using quadrature $q, tolerance $t, device $d")
    params = dict(layer="blocks.0", o=2, split="val", i=1, a=3, b="5", l=4, s=10, e=20, n=5, k=7,
                  q="6", t=1e-4, d="cuda:0", unused=1)
    q = parse(text, params)
    assert q == parse("influence of layer blocks.0 on output[2](val[1, 3..5]) from train where label = 4 "
                      "over steps 10:20 by step every 5 top 7 "
                      "using quadrature 6, tolerance 1e-4, device cuda:0")
    assert parse("evaluate with all from step $s", {"s": 3.0}).swap.from_step == 3


def test_missing_parameter_points_at_it():
    err = error("influence on test[$i]")
    assert type(err) is QueryError
    assert "missing parameter $i; pass i=..." in err.message
    assert_caret_at(err, "$i")


@pytest.mark.parametrize("text, params, token", [
    ("influence on test[$i]", {"i": "x"}, "$i"),
    ("influence on test[$i]", {"i": 1.5}, "$i"),
    ("influence on test[$i]", {"i": True}, "$i"),
    ("influence on test[$i]", {"i": [1]}, "$i"),
    ("influence of layer $l", {"l": "a b"}, "$l"),
    ("influence on $s", {"s": "1x"}, "$s"),
    ("influence using budget $b", {"b": "lots"}, "$b"),
    ("influence top $k", {"k": 10**30}, "$k"),
    ("influence top $k", {"k": 10**5000}, "$k"),
    ("influence of layer $l", {"l": 10**5000}, "$l"),
    ("influence using quadrature $q", {"q": 10**5000}, "$q"),
    ("influence using cluster $c", {"c": 10**5000}, "$c"),
    ("influence using tolerance $t", {"t": float("nan")}, "$t"),
    ("influence using tolerance $t", {"t": 10**400}, "$t"),
])
def test_bad_parameter_values(text, params, token):
    err = error(text, params)
    assert type(err) is QueryError  # the caller's binding, not the query text, is wrong
    assert_caret_at(err, token)


# ------------------------------------------------------------------ scripts

SCRIPT = """\
-- defaults; the caller may override them
param $i = 3;
param $layer = "emb";

influence of layer $layer on test[$i] by layer as layers;  -- first
kernel on test[$i..9];
;
explain check using tolerance $tol
"""


def test_script():
    entries = parse_script(SCRIPT, {"tol": "1e-5"})
    assert [e.name for e in entries] == ["layers", None, None]
    assert entries[0].query == parse("influence of layer emb on test[3] by layer")
    assert entries[1].query == parse("kernel on test[3..9]")
    assert entries[2].query == parse("explain check using tolerance 1e-5")
    assert entries[0].source == "influence of layer $layer on test[$i] by layer"
    assert entries[1].pos == SCRIPT.index("kernel") == entries[1].query.pos
    assert entries[1].query.text == SCRIPT


def test_script_caller_overrides_defaults():
    entries = parse_script(SCRIPT, {"i": 5, "tol": 0.1})
    assert entries[0].query.target.items.index == IndexList((5,))
    assert parse_script("") == [] and parse_script("-- nothing\n;;") == []


@pytest.mark.parametrize("text, message, token", [
    ("influence on test[$i]", "missing parameter $i", "$i"),
    ("param $i = 1;\nparam $i = 2;", "parameter $i declared twice", "$i = 2"),
    ("influence as a;\nkernel as a", "result name 'a' given twice", "a"),
    ("influence\nkernel", "unexpected 'kernel'", "kernel"),
])
def test_script_errors(text, message, token):
    with pytest.raises(QueryError) as info:
        parse_script(text)
    assert message in info.value.message
    assert info.value.pos == text.rindex(token)
    assert_caret_at(info.value, token)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("text, message, token", [
    ("", "unexpected end of query; expected one of: check, evaluate, explain, influence", ""),
    ("   ", "unexpected end of query", ""),
    ("infuence of layer emb", "unknown measure 'infuence'", "infuence"),
    ("influence of layer emb ovr steps 1:2", "unexpected 'ovr'; expected one of: ',', at, by", "ovr"),
    ("influence on test[0..9", "unexpected end of query; expected one of: ',', ']'", ""),
    ("influence on test[0..9]]", "unexpected ']'", "]"),
    ("influence on test(0)", "unexpected '('", "("),
    ("influence on output[1(test[0])", "unexpected '('", "(test"),
    ("influence on test[]", "unexpected ']'; expected one of: '*', ':', <$parameter>, <number>", "]"),
    ("influence as x",
     "unexpected 'as'; expected one of: at, by, from, of, on, over, top, using, with", "as"),
    ("influence by layer by step", "clause 'by' given twice", "by step"),
    ("influence of all top 3 of layer emb", "clause 'of' given twice", "of layer"),
    ("influence over steps 1:2 at step 4", "clause 'at step' conflicts with 'over steps'", "at"),
    ("influence at step 4 at step 5", "clause 'at step' given twice", "at step 5"),
    ("influence on test[9..3]", "empty range 9..3", "9..3"),
    ("influence on test[5:5]", "empty range 5:5", "5:5"),
    ("influence over steps 50..10", "empty range 50..10", "50..10"),
    ("influence on test[-1]", "negative index -1", "-1"),
    ("influence over steps -5:", "negative step -5", "-5"),
    ("influence on test where label = -2", "negative label -2", "-2"),
    ("influence on test[99999999999999999999999]", "too large", "99999999999999999999999"),
    ("influence on test[1.5]", "index must be an integer, got '1.5'", "1.5"),
    ("influence over steps 5 by layer", "unexpected 'by'; expected one of: '..', ':'", "by"),
    ("influence top 0", "top count must be at least 1, got 0", "0"),
    ("influence by step every 0", "bin size must be at least 1", "0"),
    ("influence by layer every 3", "'every' bins steps only", "every"),
    ("influence by layer, step, layer", "dimension 'layer' given twice", "layer"),
    ("influence at steps 0:10 every 2", "'every' in a steps clause is only valid for evaluate", "every"),
    ("influence with layer emb from step 3", "'with'", "with"),
    ("influence on loss[3](test[0])", "only output takes an output index", "3"),
    ("influence using quad 5", "unknown option 'quad'; valid options: budget, cluster, device", "quad"),
    ("influence using nodes 5, quadrature 6", "option 'quadrature' given twice", "quadrature"),
    ("influence using dtype float46", "dtype expects float32 or float64, got 'float46'", "float46"),
    ("influence using device gpu", "device expects cpu, cuda or cuda:N", "gpu"),
    ("influence using budget 4XB", "budget expects a size", "4XB"),
    ("influence using quadrature 0", "quadrature expects a positive integer", "0"),
    ("influence using tolerance 1e999", "tolerance expects a positive number", "1e999"),
    ("influence using tolerance -1", "tolerance expects a positive number", "-1"),
    ("influence using cluster \"\"", "cluster expects a non-empty string", '""'),
    ("influence on test[0] wher label = 3", "unexpected 'wher'", "wher"),
    ("influence\n  of layer emb\n  bye step", "unexpected 'bye'", "bye"),
    ("influence é", "unexpected 'é'", "é"),
    ("influence \x00", "unexpected '\\x00'", "\x00"),
])
def test_errors_point_at_the_offending_token(text, message, token):
    err = error(text, kind=QuerySyntaxError)
    assert message in err.message, err.render()
    assert "\n" not in err.message and "__ANON" not in err.message and "LSQB" not in err.message
    assert err.pos == (len(text.rstrip()) if token == "" else text.rindex(token)), err.render()
    if text.strip():
        assert_caret_at(err, token)


@pytest.mark.parametrize("text, hint", [
    ("infuence of layer emb", "did you mean 'influence'?"),
    ("influence of layer emb ovr steps 1:2", "did you mean 'over'?"),
    ("influence by exampel", "did you mean 'example'?"),
    ("influence using quadratur 5", "did you mean 'quadrature'?"),
    ("influence on test[0] wher label = 3", "did you mean 'where'?"),
])
def test_did_you_mean(text, hint):
    err = error(text)
    assert err.hint == hint and hint in err.render().splitlines()[0]


def test_an_unknown_target_function_lists_the_target_functions():
    err = error("influence on logits(test[0])")
    assert "unknown target function 'logits'" in err.message
    assert "label, loss, output, logprob, prob, margin" in err.message and err.pos == len("influence on ")


def test_a_component_named_without_its_kind_suggests_layer_and_param():
    err = error("influence of emb on test[0]")
    assert err.hint == "name a component by its kind: 'layer emb' or 'param emb'"


# ------------------------------------------------------------------ completion, grammar file

def test_expected_tokens():
    assert expected_tokens("") >= {"influence", "check", "kernel", "similarity", "evaluate", "explain"}
    assert expected_tokens("influence on ") == {"label", "loss", "output", "logprob", "prob", "margin",
                                                "<name>", "<$parameter>"}
    assert expected_tokens("influence of layer emb ") >= {",", "except", "on", "by", "top", "using", ";"}
    assert expected_tokens("influence on test[0") == {",", "..", ":", "]"}
    assert "as" not in expected_tokens("influence ")
    assert expected_tokens("influence of (") == set()


def test_grammar_path_prefers_package_data_over_the_repository(tmp_path, monkeypatch):
    assert grammar_path().is_file()
    monkeypatch.setattr(parser_module, "__file__", str(tmp_path / "explaind_ql" / "lang" / "parser.py"))
    for grammar in (tmp_path / "grammar" / "explaind.lark", tmp_path / "explaind_ql" / "_grammar" / "explaind.lark"):
        grammar.parent.mkdir(parents=True)
        grammar.write_text("")
        assert grammar_path() == grammar


# ------------------------------------------------------------------ round trip

VALID = [
    EXAMPLE,
    "explain analyze influence of all except layer emb on output[7](test[0]) from train where label in (1,2) "
    "using budget 4GB, device cuda:1, tolerance 1e-6, cluster \"tcp://h:1\", nodes 3 "
    "top 5 abs by step every 100, layer",
    "evaluate on test[*] at steps 0:1940 every 10 with layer emb, layer unembed from step 1939",
    "kernel on loss(test[1, 3..5, 7:]) at step 5 using dtype float64",
    "similarity of layer blocks.*.attn except param blocks.0.bias on label(loss[:5]) by layer, test",
    "check on margin(val where label = 0) over steps :10 by example top 1",
    "influence on logprob(test[0:5]) from train[0..99] where label = 3 over steps 10.. 20 by param, element",
]


@pytest.mark.parametrize("text", VALID)
def test_unparse_round_trip_examples(text):
    q = parse(text)
    assert parse(unparse(q)) == q and q.to_text() == unparse(q)


# ------------------------------------------------------------------ hypothesis

def _check(text: str, params=None, script: bool = False) -> None:
    try:
        (parse_script if script else parse)(text, params)
    except QueryError as err:
        assert 0 <= err.pos <= len(text)
        assert err.render()


@FUZZ
@given(st.text())
def test_fuzz_random_text(text):
    _check(text)
    _check(text, script=True)
    assert isinstance(expected_tokens(text), set)


TOKENS = ["influence", "of", "on", "by", "layer", "param", "all", "except", "[", "]", "(", ")",
          "..", ":", ",", ";", "*", "0", "9", "-1", "$i", "$x", "at", "step", "steps", "over",
          "every", "top", "abs", "using", "with", "from", "where", "label", "=", "in", "output",
          "\n", "--", "\"", "'", "é", "1e999", "9" * 30, "as", "explain"]

PARAM_QUERIES = ["influence on $s[$i]", "influence of layer $i", "influence over steps $i:", "influence top $i",
                 "influence on output[$i](test)", "evaluate with all from step $i",
                 "influence on test where label = $i"] + [f"influence using {o} $i" for o in (
                     "quadrature", "tolerance", "device", "dtype", "budget", "cluster")]


@FUZZ
@given(st.sampled_from(PARAM_QUERIES), st.one_of(st.integers(), st.floats(), st.text(), st.booleans(),
                                                  st.none(), st.just(10**5000)))
def test_fuzz_parameter_values(text, value):
    _check(text, {"i": value, "s": value})


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.sampled_from(["del", "ins", "dup", "swap", "chr"]),
                                                   st.integers(0, 10**6), st.integers(0, 10**6),
                                                   st.sampled_from(TOKENS)), min_size=1, max_size=4),
       st.booleans())
def test_fuzz_mutated_queries(text, mutations, script):
    tokens = text.replace("[", " [ ").replace("]", " ] ").replace(",", " , ").split()
    for op, i, j, token in mutations:
        n = len(tokens)
        if op == "del" and n:
            del tokens[i % n]
        elif op == "ins":
            tokens.insert(i % (n + 1), token)
        elif op == "dup" and n:
            tokens.insert(i % n, tokens[i % n])
        elif op == "swap" and n:
            tokens[i % n], tokens[j % n] = tokens[j % n], tokens[i % n]
        elif op == "chr" and n:
            word = tokens[i % n]
            k = j % (len(word) + 1)
            tokens[i % n] = word[:k] + token[:1] + word[k + 1:]
    _check(" ".join(tokens), {"i": 1}, script)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
paths = st.from_regex(r"[A-Za-z0-9_*]{1,4}(\.[A-Za-z0-9_*]{1,3}){0,2}", fullmatch=True)
nums = st.integers(0, 10**12)


@st.composite
def ranges(draw) -> str:
    a, b = sorted(draw(st.tuples(nums, nums)))
    form = draw(st.sampled_from(["..", ":", "a:", ":b"]))
    if form == "..":
        return f"{a}..{b}"
    b += a == b
    return {":": f"{a}:{b}", "a:": f"{a}:", ":b": f":{b}"}[form]


@st.composite
def selections(draw) -> str:
    items = st.one_of(nums.map(str), ranges())
    index = draw(st.one_of(st.just(""), st.just("[*]"), ranges().map(lambda r: f"[{r}]"),
                           st.lists(items, min_size=1, max_size=3).map(lambda xs: f"[{', '.join(xs)}]")))
    labels = draw(st.lists(st.integers(0, 99), min_size=1, max_size=3))
    where = draw(st.sampled_from(["", f" where label = {labels[0]}",
                                  f" where label in ({', '.join(map(str, labels))})"]))
    return draw(names) + index + where


@st.composite
def components(draw) -> str:
    refs = st.lists(st.tuples(st.sampled_from(["layer", "param"]), paths).map(" ".join),
                    min_size=1, max_size=3).map(", ".join)
    head = draw(st.one_of(st.just("all"), refs))
    return head + draw(st.one_of(st.just(""), refs.map(lambda r: " except " + r)))


@st.composite
def queries(draw) -> str:
    measure = draw(st.sampled_from(["influence", "check", "kernel", "similarity", "evaluate"]))
    fn = draw(st.sampled_from(["", "label", "loss", "output", "logprob", "prob", "margin", "output[3]"]))
    target = draw(selections())
    if fn == "" and target.split("[")[0].split(" ")[0].lower() in ("label", "loss", "output", "logprob",
                                                                    "prob", "margin"):
        fn = "label"
    steps = [f"over steps {draw(ranges())}", f"at step {draw(nums)}"]
    if measure == "evaluate":
        steps.append(f"at steps {draw(ranges())} every {draw(st.integers(1, 99))}")
    dims = draw(st.lists(st.sampled_from(["example", "step", "layer", "param", "element", "test", "output"]),
                         min_size=1, max_size=4, unique=True))
    every = draw(st.sampled_from(["", " every 7"]))
    settings_ = ["quadrature 5", "nodes 2", "tolerance 1e-6", "device cuda:1", "device cpu", "dtype float64",
                 "budget 4GB", "budget 1.5KiB", 'cluster "tcp://h:8786"']
    options = draw(st.lists(st.sampled_from(settings_), min_size=1, max_size=3,
                            unique_by=lambda o: {"nodes": "quadrature"}.get(o.split()[0], o.split()[0])))
    clauses = {
        "of": f"of {draw(components())}",
        "on": f"on {fn}({target})" if fn else f"on {target}",
        "from": f"from {draw(selections())}",
        "steps": draw(st.sampled_from(steps)),
        "by": "by " + ", ".join(d + every if d == "step" else d for d in dims),
        "top": f"top {draw(st.integers(1, 1000))}" + draw(st.sampled_from(["", " abs"])),
        "using": "using " + ", ".join(options),
    }
    if measure == "evaluate":
        clauses["with"] = f"with {draw(components())} from step {draw(nums)}"
    chosen = draw(st.lists(st.sampled_from(sorted(clauses)), unique=True))
    explain = draw(st.sampled_from(["", "explain ", "explain analyze "]))
    return explain + measure + "".join(" " + clauses[c] for c in chosen)


@FUZZ
@given(queries())
def test_round_trip_random_queries(text):
    q = parse(text)
    canonical = unparse(q)
    assert parse(canonical) == q
    assert unparse(parse(canonical)) == canonical
