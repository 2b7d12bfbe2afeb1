"""Path and name normalisation shared by every API.

A user path is ``/``-separated and always relative to the namespace root: a leading ``/``
and one trailing ``/`` are accepted, anything that could escape or alias (``.``, ``..``,
empty segments, NUL) is refused, so a path maps to exactly one tuple of names.
"""

from __future__ import annotations

from fastcache.errors import InvalidName, NameTooLong

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
DIGEST_LEN = 32
_HEX = frozenset("0123456789abcdef")


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates survive json.loads but not storage
        raise InvalidName(f"{what} is not valid UTF-8") from None


def validate_name(name: str) -> str:
    """Check one directory-entry name and return it unchanged."""
    if not isinstance(name, str):
        raise InvalidName("a name must be a string")
    if name in ("", ".", ".."):
        raise InvalidName(f"invalid name: {name!r}")
    if "/" in name or "\0" in name:
        raise InvalidName("a name must not contain '/' or NUL")
    if _utf8_len(name, "name") > MAX_NAME_BYTES:
        raise NameTooLong(f"name longer than {MAX_NAME_BYTES} bytes")
    return name


def split_path(path: str) -> tuple[str, ...]:
    """``"/a/b/"`` → ``("a", "b")``; ``""`` and ``"/"`` are the root, ``()``."""
    if not isinstance(path, str):
        raise InvalidName("a path must be a string")
    if "\0" in path:
        raise InvalidName("a path must not contain NUL")
    if _utf8_len(path, "path") > MAX_PATH_BYTES:
        raise NameTooLong(f"path longer than {MAX_PATH_BYTES} bytes")
    body = path[1:] if path.startswith("/") else path
    if body.endswith("/"):
        body = body[:-1]
    if not body:
        if path.startswith("//"):
            raise InvalidName("empty path segment")
        return ()
    parts = tuple(body.split("/"))
    for part in parts:
        if part == "":
            raise InvalidName("empty path segment")
        validate_name(part)
    return parts


def join_path(parts: tuple[str, ...] | list[str]) -> str:
    """The canonical spelling of a split path: ``("a", "b")`` → ``"/a/b"``."""
    return "/" + "/".join(parts)


def normalize_path(path: str) -> str:
    return join_path(split_path(path))


def is_digest(text: object) -> bool:
    """A chunk name: exactly 32 lowercase hex characters (xxh3-128)."""
    return isinstance(text, str) and len(text) == DIGEST_LEN and _HEX.issuperset(text)
