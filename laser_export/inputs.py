"""Reading the files a user points at (recipes, reports, text): regular files only, so a FIFO or a
device never blocks a run; bounded in size; UTF-8 and JSON problems become one line naming the file.
Imports nothing heavy."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import InputError


class InputFileError(InputError):
    """An input file cannot be read as what it should be. ``reason`` is the message without the file."""

    def __init__(self, what: str, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{what} {path}: {reason}")


def read_regular(path: str | Path, what: str, *, limit: int = 1 << 30) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes. Opened without blocking
    and checked on the open descriptor, so a FIFO (or one swapped in) is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise InputFileError(what, path, f"cannot read: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
            raise InputFileError(what, path, f"is {kind}; give a file")
        if st.st_size > limit:
            raise InputFileError(what, path, f"is {st.st_size} bytes, more than the {limit} this input may have")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise InputFileError(what, path, f"is more than the {limit} bytes this input may have")
        return b"".join(chunks)
    except OSError as err:
        raise InputFileError(what, path, f"cannot read: {err.strerror}") from None
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str, *, limit: int = 1 << 30) -> str:
    """UTF-8 text of a regular file; bytes that are not UTF-8 are an error naming the file and offset."""
    raw = read_regular(path, what, limit=limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(what, path, f"not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_json_object(path: str | Path, what: str, *, limit: int = 64 << 20) -> dict:
    """A JSON object from a regular file (a list, a number, invalid or too deeply nested JSON: refused)."""
    text = read_text(path, what, limit=limit)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise InputFileError(what, path, f"invalid JSON ({err})") from None
    except RecursionError:
        raise InputFileError(what, path, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise InputFileError(what, path, f"holds a JSON {type(data).__name__}, expected an object")
    return data
