"""Prompt templates (bus/prompts.py) as the roster declares them: filled from arguments, with clear
errors for what is missing, unknown, or declared but unused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.errors import BadRequest
from bus.prompts import PromptTemplate
from specialists.roster import RosterError, load_roster

pytestmark = pytest.mark.fast


def test_only_declared_placeholders_are_filled() -> None:
    t = PromptTemplate.model_validate(
        {
            "template": "Fix this {lang} code: {code} (keep {braces} and {{x}})",
            "arguments": [{"name": "code"}, {"name": "lang", "required": False}],
        }
    )
    assert t.render({"code": "f({1})", "lang": "Go"}) == "Fix this Go code: f({1}) (keep {braces} and {{x}})"
    assert t.render({"code": "x"}) == "Fix this code: x (keep {braces} and {{x}})"
    with pytest.raises(BadRequest, match="missing required argument"):
        t.render({"lang": "Go"})
    with pytest.raises(BadRequest, match=r"unknown argument\(s\): colour \(expected: code, lang\)"):
        t.render({"code": "x", "colour": "red"})


def test_a_roster_prompt_with_an_unused_argument_does_not_load(tmp_path: Path) -> None:
    roster = tmp_path / "roster.toml"
    roster.write_text(
        """
[specialists.apollo]
description = "d"
primary = ["code"]
capabilities = { code = 0.9 }
system_prompt = "-"
provider = "scripted"

[specialists.apollo.prompts.review]
template = "Review {code}"
arguments = [{ name = "code" }, { name = "style" }]
"""
    )
    with pytest.raises(RosterError, match=r"arguments not in the template as \{name\}: style"):
        load_roster(roster)


def test_the_shipped_roster_s_prompts_are_announced() -> None:
    apollo = load_roster()["apollo"]
    assert set(apollo.prompts) >= {"review", "explain-error"}
    assert '"review"' in apollo.endpoint_metadata()["prompts"]
