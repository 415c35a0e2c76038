import shlex

import pytest

from aish_client.parser import Echo, Kind, PipelineSyntaxError, Redirect, parse, tokenize


def names(stage) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(t) for t in stage.targets]


def test_echo_chain() -> None:
    p = parse('echo "explain queue groups" | apollo | athena')
    assert p.source == Echo("explain queue groups", 1)
    assert [names(s) for s in p.stages] == [["apollo"], ["athena"]]
    assert p.redirect is None


def test_stage_messages_and_redirects() -> None:
    p = parse("apollo 'what is' \"this\" > out.md")
    assert p.stages[0].message == "what is this"
    assert p.redirect == Redirect("out.md", False, 25)
    assert parse("echo hi | athena >> log.txt").redirect == Redirect("log.txt", True, 18)
    assert parse('apollo << "a | b , c"').stages[0].message == "a | b , c"


def test_fan_out_and_capabilities_parse() -> None:
    p = parse('apollo,athena,prometheus << "msg"')
    assert names(p.stages[0]) == ["apollo", "athena", "prometheus"] and p.stages[0].fan_out
    p = parse("{apollo|athena} | prometheus")
    assert p.stages[0].grouped and names(p.stages[0]) == ["apollo", "athena"]
    assert not p.stages[1].fan_out
    assert parse('@code-analysis << "x"').stages[0].targets[0].capability


@pytest.mark.parametrize(
    "line",
    [
        "plain words here",
        '\'single quoted\' "double \\" quoted"',
        r"back\ slash",
        "mix'ed'\"quotes\"",
        "a\\\\b",
    ],
)
def test_words_follow_shlex(line: str) -> None:
    words = [t.text for t in tokenize(line) if t.kind is Kind.WORD]
    assert words == shlex.split(line)


@pytest.mark.parametrize(
    ("line", "column", "fragment"),
    [
        ("", 1, "empty pipeline"),
        ("apollo | ", 10, "expected a specialist"),
        ('echo "abc', 6, "unterminated double quote"),
        ("apollo 'x", 8, "unterminated single quote"),
        ("Apollo x", 1, "not a valid specialist name"),
        ("apollo > ", 10, "file name"),
        ("apollo | echo x", 10, "echo can only start"),
        ("{apollo|athena", 15, "'}'"),
        ("apollo < f", 8, "'<' is not supported"),
        ("echo x y", 1, "echo needs a specialist"),
        ("apollo x > f g", 14, "unexpected 'g'"),
    ],
)
def test_syntax_errors_point_at_the_column(line: str, column: int, fragment: str) -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        parse(line)
    assert info.value.column == column
    assert fragment in info.value.message
    rendered = info.value.render().splitlines()
    assert rendered[2].index("^") - 2 == column - 1
