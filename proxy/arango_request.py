"""How ArangoDB reads a request's query string and repeated header fields.

The proxy decides some things from a request the way ArangoDB would (whether
it is async, who sends it, what a job-API call asks for), so it must read the
request as ArangoDB reads it, not as aiohttp or yarl do (arangodb-async-api.md;
ArangoDB's ``HttpRequest::parseUrl``, ``setValue`` and ``setHeader``):

- A header field sent more than once: the last one counts (``setHeader``
  overwrites). ``x-arango-async: false`` then ``x-arango-async: store`` is a
  job; two ``Authorization`` fields are the second one's caller.
- Query parameters: a name runs up to the first ``=``, an ``&`` included
  (``?x&stamp=5`` names ``x&stamp``); a value runs up to the next ``&`` or the
  end. A name without ``=``, and an ``=`` that ends the query, set nothing
  (``?count`` and ``?count=`` leave the default; ``?count=&x=1`` sets it
  empty). Of repeated names the last counts; ``name[]`` is an array
  parameter, not ``name``. Names and values are %-decoded, ``+`` as a space.
  (A broken %-escape, which ArangoDB refuses, is kept as it came: it reads as
  no number either way.)
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from multidict import CIMultiDict, CIMultiDictProxy


def header(headers: CIMultiDict[str] | CIMultiDictProxy[str], name: str) -> str | None:
    """The value ArangoDB reads for header field `name`: the last one sent."""
    values = headers.getall(name, ())
    return values[-1] if values else None


def query_params(raw_query: str) -> dict[str, str]:
    """The query string's parameters (without the ``?``), as ArangoDB reads them."""
    params: dict[str, str] = {}
    start = 0
    while True:
        equals = raw_query.find("=", start)
        if equals < 0 or equals + 1 == len(raw_query):
            return params
        end = raw_query.find("&", equals + 1)
        if end < 0:
            end = len(raw_query)
        name = raw_query[start:equals]
        if len(name) <= 2 or not name.endswith("[]"):
            params[_decoded(name)] = _decoded(raw_query[equals + 1 : end])
        start = end + 1


def _decoded(text: str) -> str:
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "surrogateescape")
