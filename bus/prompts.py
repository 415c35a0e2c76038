"""Prompt templates a specialist offers (the roster's ``prompts``), announced in its ``$SRV.INFO``
and served as MCP prompts by ``tekton mcp`` and the bridge's ``/mcp``.

A template is text with ``{argument}`` placeholders; only declared arguments are filled, so other
braces (code, JSON) stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import Field, model_validator

from bus.errors import BadRequest
from bus.wire import Wire

PROMPT_NAME = r"^[a-z0-9][a-z0-9_-]{0,47}$"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FILLED = re.compile(r"( ?)\{([A-Za-z_][A-Za-z0-9_]*)\}")  # an empty value takes its leading space along


class PromptArgument(Wire):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")
    description: str = ""
    required: bool = True


class PromptTemplate(Wire):
    description: str = ""
    template: str = Field(min_length=1)
    arguments: list[PromptArgument] = []

    @model_validator(mode="after")
    def _arguments_are_placeholders(self) -> PromptTemplate:
        used = set(_PLACEHOLDER.findall(self.template))
        unused = [a.name for a in self.arguments if a.name not in used]
        if unused:
            raise ValueError(f"arguments not in the template as {{name}}: {', '.join(unused)}")
        names = [a.name for a in self.arguments]
        if len(set(names)) != len(names):
            raise ValueError("an argument is declared twice")
        return self

    def render(self, values: Mapping[str, str]) -> str:
        """The prompt text with ``values`` filled in (a missing optional argument is empty)."""
        declared = {a.name for a in self.arguments}
        unknown = sorted(set(values) - declared)
        if unknown:
            expected = ", ".join(sorted(declared)) or "none"
            raise BadRequest(f"unknown argument(s): {', '.join(unknown)} (expected: {expected})")
        missing = [a.name for a in self.arguments if a.required and not values.get(a.name)]
        if missing:
            raise BadRequest(f"missing required argument(s): {', '.join(missing)}")

        def fill(m: re.Match[str]) -> str:
            if m[2] not in declared:
                return m[0]
            value = values.get(m[2], "")
            return m[1] + value if value else ""

        return _FILLED.sub(fill, self.template)
