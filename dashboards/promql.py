"""What a PromQL expression reads, for the tests that check boards and rules against /metrics.

A lexical reading, not a parser: PromQL's grammar makes a metric name the only identifier
that is neither a function (followed by `(`), a keyword, a label (inside `{}` or a
`by (...)` clause) nor part of a number or duration. That is enough to catch a misspelt or
renamed metric without a Go parser in the test environment.
"""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[a-zA-Z_:][\w:]*")
# `/`, then any vector-matching modifiers before its right-hand side.
_DIVISION = re.compile(
    r"/\s*(?:(?:on|ignoring)\s*\([^)]*\)\s*)?(?:group_(?:left|right)\s*(?:\([^)]*\)\s*)?)?"
)
_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right bool offset atan2 inf nan".split()
)


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (`{__name__="x"}` included), without functions or labels."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(match.group())
    return names


def unguarded_divisions(expr: str) -> list[str]:
    """The divisors in `expr` not written `(... > 0)`, where an idle series would give NaN.

    A number is a safe divisor too. Returns the offending divisors as written.
    """
    text = _STRING.sub('""', expr)
    found = []
    for match in _DIVISION.finditer(text):
        start = match.end()
        if re.match(r"[\d.]+\b", text[start:]):
            continue
        group = _parenthesised(text, start)
        if group is None or not re.search(r">\s*0\s*$", _top_level(group)):
            found.append(group or text[start:].split(" ")[0])
    return found


def _parenthesised(text: str, start: int) -> str | None:
    """The inside of the parenthesis that opens at `start`, or None if none opens there."""
    if not text.startswith("(", start):
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    return None


def _top_level(group: str) -> str:
    """`group` with every nested parenthesis emptied, so `>` is only found at its own level."""
    previous = None
    while previous != group:
        previous, group = group, re.sub(r"\([^()]*\)", "", group)
    return group
