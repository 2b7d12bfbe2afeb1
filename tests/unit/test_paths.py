"""Path normalisation: one spelling per path, nothing that escapes or aliases."""

from __future__ import annotations

import pytest

from fastcache.errors import InvalidName, NameTooLong
from fastcache.paths import is_digest, join_path, normalize_path, split_path, validate_name


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("", ()),
        ("/", ()),
        ("a", ("a",)),
        ("/a", ("a",)),
        ("/a/", ("a",)),
        ("a/b/c", ("a", "b", "c")),
        ("/a/b/c/", ("a", "b", "c")),
        ("/.hidden/..dots/...", (".hidden", "..dots", "...")),
        ("/sp ace/ünï/日本", ("sp ace", "ünï", "日本")),
        ("/" + "x" * 255, ("x" * 255,)),
        ("/" + "é" * 127 + "x", ("é" * 127 + "x",)),  # 255 bytes exactly
    ],
)
def test_split_path_accepts(path: str, parts: tuple[str, ...]) -> None:
    assert split_path(path) == parts
    assert split_path(join_path(parts)) == parts


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "/..",
        "/a/../b",
        "/a/..",
        ".",
        "/./a",
        "/a/.",
        "a//b",
        "//",
        "//a",
        "///",
        "/a//",
        "/a\0b",
        "\0",
        "/a/\udc80",  # a lone surrogate: not encodable, must not reach storage
    ],
)
def test_split_path_refuses(path: str) -> None:
    with pytest.raises(InvalidName):
        split_path(path)


def test_name_too_long_counts_utf8_bytes() -> None:
    with pytest.raises(NameTooLong):
        split_path("/" + "x" * 256)
    with pytest.raises(NameTooLong):
        split_path("/a/" + "é" * 128)  # 128 characters, 256 bytes
    with pytest.raises(NameTooLong):
        split_path("/a" * 2100)  # whole path over 4096 bytes


def test_not_a_string() -> None:
    with pytest.raises(InvalidName):
        split_path(b"/a")  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        validate_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a\0", "\udcff"])
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "...", ".a", "a.", "x" * 255, "日本語"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


def test_normalize_path() -> None:
    assert normalize_path("a/b/") == "/a/b"
    assert normalize_path("/") == "/"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0123456789abcdef0123456789abcdef", True),
        ("0" * 32, True),
        ("0123456789ABCDEF0123456789abcdef", False),
        ("0" * 31, False),
        ("0" * 33, False),
        ("g" * 32, False),
        ("../" + "0" * 29, False),
        (None, False),
        (123, False),
    ],
)
def test_is_digest(text: object, ok: bool) -> None:
    assert is_digest(text) is ok
