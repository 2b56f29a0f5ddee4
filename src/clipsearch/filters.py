"""What a metadata filter means, in one place: equality (``{"label": ["cat", "dog"]}``: any of
the values) and ranges (``{"width": {"gte": 1000}}``, ``{"taken_at": {"lt": "2024-07-01"}}``).

The stores turn these rules into SQL (SQLite's JSON functions, PostgreSQL's JSON paths) so that
they apply inside the vector search; ``matches`` applies them to a source's rows in Python (a
catalog's ``ingest --filter``). The rules:

- a value also matches the number or boolean it spells, and a number its text (``typed_variants``);
- a range bound that is a number compares numerically with numbers and with text that spells
  one (catalog columns are text); any other text compares in code-point order, so ISO 8601
  dates and times compare by time;
- a date or the start of one (``2024``, ``2024-06``, ``2024-06-30``) names its whole span: as
  ``lte`` or ``gt`` bound it reaches past every time inside it;
- an equality with a day (``taken_at=2024-06-15``) means that day, as a range does: any time on
  it (``2024-06-15T18:02:11+02:00``) matches, not only the bare date;
- ``{"camera_make": {"iexact": "apple"}}`` (a value or a list) is equality of text with the
  letters A-Z folded to a-z (``fold``), the folding SQLite's NOCASE does. Only ASCII letters fold,
  so that SQLite, PostgreSQL (whatever its locale) and Python agree on every value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

_FILTER_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


RANGE_OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# a date, or the start of one (2024, 2024-06, 2024-06-01, 2024-06-01T10): as an upper bound
# (lte) or a lower one that excludes it (gt) it names the whole span, so it gains a character
# that sorts after every character of an ISO 8601 date
_DATE_PREFIX_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2}([T ]\d{2}(:\d{2}(:\d{2})?)?)?)?)?$")
DATE_SPAN_END = "~"
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# A-Z to a-z and nothing else: the one folding all three engines can do identically
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
FOLDED = "iexact"


def fold(text: str) -> str:
    """Text as case-insensitive equality compares it: ASCII letters lowered, the rest as it is."""
    return text.translate(_ASCII_LOWER)


def _day(value: Any) -> str | None:
    """The day an equality filter names (``2024-06-15``), else None."""
    return value.strip() if isinstance(value, str) and _DAY_RE.match(value.strip()) else None


@dataclass(frozen=True)
class Range:
    """A range condition on one metadata key: ``value OP bound``. A bound that is a number
    (``number``) compares numerically with numbers and with text that spells one, as catalog
    columns do; other text compares with ``text`` in code-point order, so ISO 8601 dates and
    times compare by time."""

    key: str
    op: str  # gt | gte | lt | lte
    number: float | None
    text: str

    @property
    def sql(self) -> str:
        return RANGE_OPERATORS[self.op]


# Bounds on one filter: far above what a person or a catalog job writes, far below what makes a
# query plan (SQLite's expression depth, a JSON path per key) fail or take seconds.
MAX_FILTER_KEYS = 64
MAX_FILTER_VALUES = 1024  # values in all lists together
MAX_VALUE_CHARS = 4096


def check_filters(filters: Any) -> None:
    """Refuse, with what is wrong and the key it is wrong in, any filter that is not an object of
    keys whose values are a value, a non-empty list of values or an object of operators (a value
    is text, a finite number or a boolean), or that passes the bounds above."""
    if filters is None:
        return
    if not isinstance(filters, dict):
        raise UsageError(
            f"a filter is an object of metadata keys and values, not {type(filters).__name__}", param="filter"
        )
    if len(filters) > MAX_FILTER_KEYS:
        raise UsageError(f"a filter may name at most {MAX_FILTER_KEYS} keys, not {len(filters)}", param="filter")
    count = 0
    for key, value in filters.items():
        if not isinstance(key, str):
            raise UsageError(f"bad filter key {key!r}", param="filter")
        _check_key(key)
        if isinstance(value, dict):
            if not value:
                raise UsageError(f"filter {key!r} has no condition; use gt, gte, lt, lte or iexact", param="filter")
            for op, bound in value.items():
                if op not in RANGE_OPERATORS and op != FOLDED:
                    raise UsageError(
                        f"unknown filter operator {op!r} on {key!r}; use gt, gte, lt, lte or iexact", param="filter"
                    )
                count += _check_values(key, bound, allow_list=op == FOLDED)
        else:
            count += _check_values(key, value, allow_list=True)
        if count > MAX_FILTER_VALUES:
            raise UsageError(f"a filter may list at most {MAX_FILTER_VALUES} values in all", param="filter")


def _check_values(key: str, value: Any, allow_list: bool) -> int:
    """How many values ``value`` holds, after refusing what no filter means."""
    if isinstance(value, list | tuple) and allow_list:
        if not value:
            raise UsageError(f"filter {key!r} has no values: give one, or a list of one or more", param="filter")
        for v in value:
            if isinstance(v, list | tuple | dict):
                raise UsageError(f"filter {key!r} takes a value or a list of values, not nested lists", param="filter")
            _check_value(key, v)
        return len(value)
    _check_value(key, value)
    return 1


def _check_value(key: str, value: Any) -> None:
    if value is None:
        raise UsageError(f"filter {key!r} has no value", param="filter")
    if isinstance(value, list | tuple | dict):
        raise UsageError(f"filter {key!r}: a bound is one value, not {type(value).__name__}", param="filter")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"filter {key!r} needs a finite number, not {value}", param="filter")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise UsageError(f"filter {key!r}: {value} is beyond the 64-bit integers stored values use", param="filter")
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise UsageError(f"filter {key!r}: a value may be at most {MAX_VALUE_CHARS} characters", param="filter")
    if not isinstance(value, str | int | float | bool):
        raise UsageError(f"filter {key!r}: {type(value).__name__} is not a value", param="filter")


def _check_key(key: str) -> str:
    if not _FILTER_KEY_RE.match(key):
        raise UsageError(f"bad filter key {key!r}", param="filter")
    return key


def filter_values(filters: dict[str, Any] | None) -> list[tuple[str, list[Any]]]:
    """(metadata key, accepted values) per equality filter; a value list means any of them. The
    whole filter is checked first (``check_filters``: keys too, since backends put them into JSON
    paths). Each value also matches the number or boolean it spells, and a number its text
    (``typed_variants``). Range filters (a value that is a dict of operators) are
    ``filter_ranges``'."""
    check_filters(filters)
    out = []
    for key, value in (filters or {}).items():
        if isinstance(value, dict) or _day(value):
            continue  # a range, or a day (which filter_ranges spans)
        values = list(value) if isinstance(value, list | tuple) else [value]
        out.append((key, list(dict.fromkeys(v for x in values for v in typed_variants(x)))))
    return out


def filter_ranges(filters: dict[str, Any] | None) -> list[Range]:
    """The range conditions among ``filters``: ``{key: {"gte": 1000, "lt": "2024-07-01"}}``."""
    check_filters(filters)
    out = []
    for key, value in (filters or {}).items():
        day = _day(value)
        if day:  # key=2024-06-15: from the start of the day to past its last moment
            out += [Range(key, "gte", None, day), Range(key, "lte", None, day + DATE_SPAN_END)]
            continue
        if not isinstance(value, dict):
            continue
        for op, bound in value.items():  # check_filters refused empty conditions and other operators
            if op == FOLDED:
                continue  # filter_folded's
            if isinstance(bound, bool) or bound == "":  # check_filters let only values through
                raise UsageError(
                    f"filter {key} {RANGE_OPERATORS[op]} needs a number, a date or a word, not {bound!r}",
                    param="filter",
                )
            text = bound if isinstance(bound, str) else str(bound)
            text = text.strip()
            number = next((v for v in typed_variants(text) if isinstance(v, int | float)), None)
            if isinstance(bound, int | float):
                number = float(bound)
            if op in ("lte", "gt") and _DATE_PREFIX_RE.match(text):
                text += DATE_SPAN_END
            out.append(Range(key, op, None if number is None else float(number), text))
    return out


def filter_folded(filters: dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """(metadata key, folded texts) per case-insensitive equality, ``{key: {"iexact": TEXT}}``
    (or a list of texts: any of them); a value passes when it is text whose ``fold`` is one of them."""
    check_filters(filters)
    out = []
    for key, value in (filters or {}).items():
        if not isinstance(value, dict) or FOLDED not in value:
            continue
        wanted = value[FOLDED]
        texts = list(wanted) if isinstance(wanted, list | tuple) else [wanted]  # not empty: check_filters
        if not all(isinstance(t, str) for t in texts):
            raise UsageError(f"filter {key} iexact compares text: give a string or a list of strings", param="filter")
        out.append((key, list(dict.fromkeys(fold(t) for t in texts))))
    return out


def under(folder: str | Path, key: str = "path") -> dict[str, Any]:
    """The filter for items whose ``path`` lies below ``folder`` (a code-point range over the
    absolute paths, which every store applies inside its index search)."""
    prefix = os.path.join(os.path.abspath(os.path.expanduser(folder)), "")
    # every path that starts with the prefix sorts at or after it and before the prefix whose
    # separator is followed by the next code point
    return {key: {"gte": prefix, "lt": prefix[:-1] + chr(ord(prefix[-1]) + 1)}}


def as_number(value: Any) -> float | None:
    """The number a text value spells (``" 19.99"``), else None: how range filters read catalog
    columns, which are text."""
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    return None


_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def typed_variants(value: Any) -> list[Any]:
    """The values a filter value stands for. A command line's ``--filter width=500`` is always
    text, while decoding stored ``width`` as the integer 500 (and a catalog may hold either): so
    ``"500"`` also matches 500, ``"true"`` matches true, and the number 500 matches ``"500"``."""
    if isinstance(value, bool):
        return [value, "true" if value else "false"]
    if isinstance(value, int | float):
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        return [value, text]
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lower() in ("true", "false"):
            return [value, stripped.lower() == "true"]
        if _NUMBER_RE.match(stripped):
            number = float(stripped)
            if number.is_integer() and abs(number) < 2**53:
                return [value, int(number)]
            return [value, number]
    return [value]


def matches(metadata: dict[str, Any], filters: dict[str, Any] | None) -> bool:
    """Whether ``metadata`` passes every filter, by the rules above (a list value passes when
    any element does)."""
    return matcher(filters)(metadata)


def matcher(filters: dict[str, Any] | None) -> Callable[[dict[str, Any]], bool]:
    """``matches`` with the filters read once (a bad one raises here), for many items."""
    values, ranges, folded = filter_values(filters), filter_ranges(filters), filter_folded(filters)

    def test(metadata: dict[str, Any]) -> bool:
        for key, wanted in values:
            if not any(_equal(v, w) for v in _listed(metadata.get(key)) for w in wanted):
                return False
        for key, texts in folded:
            if not any(isinstance(v, str) and fold(v) in texts for v in _listed(metadata.get(key))):
                return False
        return all(any(_in_range(v, r) for v in _listed(metadata.get(r.key))) for r in ranges)

    return test


def _equal(value: Any, wanted: Any) -> bool:
    """Equality as JSON has it: true is not 1, 500.0 is 500."""
    if isinstance(value, bool) or isinstance(wanted, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value == wanted
    if isinstance(value, int | float) and isinstance(wanted, int | float):
        return value == wanted
    return type(value) is type(wanted) and value == wanted


def _listed(value: Any) -> list[Any]:
    return [v for v in (value if isinstance(value, list) else [value]) if v is not None]


_COMPARE = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _in_range(value: Any, r: Range) -> bool:
    compare = _COMPARE[r.op]
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return r.number is not None and compare(value, r.number)
    if isinstance(value, str):
        number = as_number(value)
        if r.number is not None and number is not None:
            return compare(number, r.number)
        # code-point order, as SQLite's BINARY collation and JSON path comparisons
        return compare(value, r.text)
    return False
