"""Text safe to print or log: URLs without their passwords, an exception in one line.

Every process quotes URLs (its settings, an error about a server it cannot reach), and
those URLs carry the broker's and the database's passwords.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from schemas.brokers import NEXT_URL

_MASK = "***"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, safe to print or log; each
    URL of a comma-separated list of them (a broker's nodes, ``schemas.brokers``).

    Works on the raw text rather than a URL parser so that a password holding
    characters it should have percent-encoded (``/``, ``#``, ``?``) is still hidden.
    """
    urls = NEXT_URL.split(url)
    if len(urls) > 1:
        return ",".join(_redact_one(each) for each in urls)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if not separator:
        return _MASK if "@" in url else url
    userinfo, at, hostinfo = rest.rpartition("@")
    username, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}://{username}:{_MASK}@{hostinfo}"


def redact_urls_in(text: str) -> str:
    """``text`` with every URL in it redacted, e.g. an error message quoting one."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def describe(error: BaseException) -> str:
    """The exception as one line, without any password a URL in it carried."""
    if isinstance(error, ValidationError):
        # Its first line only says how many errors; the fields are what matters.
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors()
        )
        summary = f"invalid {error.title}: {problems}"
    else:
        # Later lines are SQL text, documentation links and the like.
        lines = str(error).strip().splitlines()
        summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return redact_urls_in(summary)
