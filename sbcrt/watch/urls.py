"""Source and broker URLs as logs and records may show them: without their password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with its password replaced by *** (rtsp://user:secret@cam/ -> rtsp://user:***@cam/).

    The user info ends at the authority's last "@", so a password holding "@" or ":" is hidden whole. A password
    with an unencoded "/", "?" or "#" ends a URL parser's authority early (RFC 3986; encode it as %2F): when that
    leaves a port that is not a number, everything up to the URL's last "@" is taken as user info instead.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" of an IPv6 host
        return _redact_to_last_at(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        if ":" not in userinfo:
            return url
        user = userinfo.split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        return _redact_to_last_at(url)
    return url


def _redact_to_last_at(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}"
