"""The identifier pattern language of Patient IDs and accession numbers.

`PID{7digits}` → PID0000042; `{YYYY}{2letters}{7digits}` → 2026KQ0000001. Tokens: literals,
`{YYYY}` `{YY}` `{MM}` `{DD}` (today), `{Nletters}` and `{Nhex}` (random, upper case) and
`{Ndigits}` (the field's persisted counter, zero-padded to N). The counter's value comes in as
an argument: this module stays pure.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import date

_TOKEN = re.compile(r"\{([^{}]*)\}")
_SIZED = re.compile(r"^([1-9][0-9]?)(letters|hex|digits)$")
_DATE_WIDTH = {"YYYY": 4, "YY": 2, "MM": 2, "DD": 2}
_HEX = "0123456789ABCDEF"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Characters allowed in literals: SH and LO are the default repertoire without backslash (PS3.5 6.2).
_LITERAL = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")


class PatternError(ValueError):
    pass


@dataclass(frozen=True)
class _Token:
    kind: str  # literal | date | letters | hex | digits
    value: str
    width: int


@dataclass(frozen=True)
class Pattern:
    text: str
    tokens: tuple[_Token, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        tokens: list[_Token] = []
        position = 0
        for match in _TOKEN.finditer(text):
            tokens.extend(_literal(text[position : match.start()]))
            tokens.append(_placeholder(match.group(1)))
            position = match.end()
        tokens.extend(_literal(text[position:]))
        if sum(t.kind == "digits" for t in tokens) > 1:
            raise PatternError("at most one {Ndigits} counter per pattern")
        if not tokens:
            raise PatternError("empty pattern")
        return cls(text, tuple(tokens))

    @property
    def max_length(self) -> int:
        return sum(t.width for t in self.tokens)

    @property
    def counter_width(self) -> int | None:
        """N of the `{Ndigits}` counter, or None when the pattern has none."""
        return next((t.width for t in self.tokens if t.kind == "digits"), None)

    def render(self, counter: int | None, today: date, rng: random.Random) -> str:
        parts: list[str] = []
        for token in self.tokens:
            if token.kind == "literal":
                parts.append(token.value)
            elif token.kind == "date":
                parts.append(today.strftime({"YYYY": "%Y", "YY": "%y", "MM": "%m", "DD": "%d"}[token.value]))
            elif token.kind == "letters":
                parts.append("".join(rng.choice(_LETTERS) for _ in range(token.width)))
            elif token.kind == "hex":
                parts.append("".join(rng.choice(_HEX) for _ in range(token.width)))
            else:
                if counter is None:
                    raise PatternError(f"pattern {self.text!r} needs a counter value")
                digits = str(counter).zfill(token.width)
                if len(digits) > token.width or counter < 0:
                    raise PatternError(
                        f"counter value {counter} does not fit {{{token.width}digits}} of {self.text!r}: "
                        "widen the pattern (values are never reused)"
                    )
                parts.append(digits)
        return "".join(parts)


def _literal(text: str) -> list[_Token]:
    if not text:
        return []
    if "{" in text or "}" in text:
        raise PatternError(f"unbalanced brace in {text!r}")
    if not _LITERAL.match(text):
        raise PatternError(f"literal {text!r} has a backslash or a character outside printable ASCII")
    return [_Token("literal", text, len(text))]


def _placeholder(body: str) -> _Token:
    if body in _DATE_WIDTH:
        return _Token("date", body, _DATE_WIDTH[body])
    match = _SIZED.match(body)
    if match is None:
        raise PatternError(
            f"unknown placeholder {{{body}}} (known: {{YYYY}} {{YY}} {{MM}} {{DD}} {{Nletters}} {{Nhex}} {{Ndigits}})"
        )
    return _Token(match.group(2), "", int(match.group(1)))
