"""ArangoDB's lenient parsers as the stand-in copies them: numbers (job ids, count,
stamp), query strings, repeated header fields."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from tests.standin.call import (
    UINT64_MAX,
    boolean,
    double_decimal,
    last_fields,
    query_values,
    uint64,
)
from tests.standin.server import split_database


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("123", 123),
        ("0123", 123),
        ("123abc", 123),
        ("abc", 0),
        ("", 0),
        ("-5", 0),
        ("+5", 0),
        (" 5", 0),
        ("18446744073709551615", UINT64_MAX),
        ("18446744073709551616", 0),
        ("99999999999999999999999", 0),
        ("1" * 5000, 0),  # overflow, not Python's int() limit
        ("0" * 5000 + "7", 7),  # leading zeros do not overflow
        ("\u0663", 0),  # an Arabic-Indic three is no ASCII digit
    ],
)
def test_uint64(text: str, value: int) -> None:
    assert uint64(text) == value


@given(st.integers(min_value=0, max_value=UINT64_MAX), st.text(alphabet="abc/-. x"))
def test_uint64_reads_leading_digits(number: int, tail: str) -> None:
    assert uint64(f"{number}{tail}") == number


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12.0),
        ("1.5", 1.5),
        ("-2.25", -2.25),
        ("+3", 3.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("2.5E-1", 0.25),
        ("1e", 1.0),
        ("abc", 0.0),
        ("1.5x", 0.0),
        ("1e3x", 0.0),
        ("1.2.3", 0.0),
        ("", 0.0),
        ("1e999", math.inf),
    ],
)
def test_double_decimal(text: str, value: float) -> None:
    assert double_decimal(text) == value


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False).map(lambda f: round(f, 3)))
def test_double_decimal_reads_plain_decimals(number: float) -> None:
    assert double_decimal(f"{number:.3f}") == pytest.approx(number)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("", False),
    ],
)
def test_boolean(text: str, value: bool) -> None:
    assert boolean(text) is value


@pytest.mark.parametrize(
    ("raw_path", "split"),
    [
        ("/_api/job/1", ("_system", "/_api/job/1")),
        ("//_api//job///1", ("_system", "/_api/job/1")),
        ("/_db/shop//_api/job", ("shop", "/_api/job")),
        ("//_db//shop/_api/job", ("shop", "/_api/job")),
        ("/_db/my%20db/_api/x%2Fy", ("my db", "/_api/x%2Fy")),
    ],
)
def test_split_database_collapses_slashes_like_parse_url(
    raw_path: str, split: tuple[str, str]
) -> None:
    assert split_database(raw_path) == split


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        # as HttpRequest::parseUrl reads them (arangod 3.11/3.12 source): the name
        # phase ends only at `=`, the value phase at `&` or the end; nothing is set
        # for a name without `=`, or an `=` that ends the string
        ("", {}),
        ("count", {}),
        ("count=", {}),
        ("count=&x=1", {"count": "", "x": "1"}),
        ("x&count=5", {"x&count": "5"}),
        ("count=1&count=2", {"count": "2"}),  # setValue overwrites
        ("a=1&&b=2", {"a": "1", "&b": "2"}),
        ("a=b=c", {"a": "b=c"}),
        ("=5", {"": "5"}),
        ("count[]=3", {}),  # an array value, not `count`
        ("[]=3", {"[]": "3"}),
        ("count=%31&n%61me=+a", {"count": "1", "name": " a"}),  # urlDecode: %XX, + as space
        ("a=1&b", {"a": "1"}),
        ("k=v&k=&", {"k": ""}),
    ],
)
def test_query_strings_are_read_as_arangodb_reads_them(raw: str, values: dict[str, str]) -> None:
    assert query_values(raw) == values


def test_of_repeated_header_fields_the_last_counts() -> None:
    """HttpRequest::setHeader overwrites: one value a name, the last one sent."""
    sent = CIMultiDict(
        [("X-Arango-Async", "false"), ("Authorization", "a"), ("x-arango-async", "store")]
    )
    fields = last_fields(CIMultiDictProxy(sent))
    assert fields.getall("x-arango-async") == ["store"]
    assert fields["authorization"] == "a"
