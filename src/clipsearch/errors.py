"""Library errors: types with fields, each with one line that says what is wrong and what to do.

The library words a message for any caller; the faces word the rest for their audience. The CLI
prints ``error: <message>`` and exits with ``exit_code``, naming ``param`` as a flag
(``--same-filter``); the HTTP API answers JSON with a status and names ``param`` as the request
field (``same_filter``). Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .identity import ModelIdentity


_MARK = "\x1f"  # brackets an argument's name in a message (ASCII unit separator: never in user text)


def option(name: str) -> str:
    """An argument named in a message, as the Python API names it (``same_filter``). Each face
    words it for its users: the CLI as a flag (``--same-filter``), HTTP as the request field,
    ``str(error)`` as the Python name. The library never writes a CLI flag itself."""
    return f"{_MARK}{name}{_MARK}"


def _render(template: str, name: Callable[[str], str]) -> str:
    parts = template.split(_MARK)
    return "".join(name(part) if i % 2 else part for i, part in enumerate(parts))


class Wording(str):
    """A message that is not an error (a notice) naming arguments with ``option()``: as a string
    it reads with the Python names; ``worded(name)`` reads as a face names them."""

    template: str

    def __new__(cls, template: str) -> Wording:
        text = super().__new__(cls, _render(template, str))
        text.template = template
        return text

    def worded(self, name: Callable[[str], str] = str) -> str:
        return _render(self.template, name)


class ClipsearchError(Exception):
    """An error the user can fix; ``str(err)`` is the one-line explanation.

    ``param``: the argument the error is about, as the Python API names it (``same_filter``), so
    that each face can name it as its users know it. Messages name arguments with ``option()``.
    """

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None):
        self.template = message
        self.message = _render(message, str)
        super().__init__(self.message)
        self.param = param

    def worded(self, name: Callable[[str], str] = str) -> str:
        """The message with every argument named by ``name`` (a face's own naming: a flag, a
        field); ``param`` is appended where the message does not name it already."""
        text = _render(self.template, name)
        if self.param and _MARK + self.param + _MARK not in self.template:
            return f"{text} ({name(self.param)})"
        return text


class MissingWeightsError(ClipsearchError):
    """The model's weights are neither cached nor downloadable."""


class MissingExtraError(ClipsearchError):
    """Something asked for needs an optional part that is not installed.

    ``what``: what needs it (``exporting ViT-B-32 to ONNX``); ``extra``: the extra that brings it
    (``torch``), so that the message names the install line."""

    def __init__(self, what: str, extra: str, *, hint: str = ""):
        self.what = what
        self.extra = extra
        line = f"pip install 'clipsearch[{extra}]'"
        super().__init__(f"{what} needs the '{extra}' extra: {line}{hint}")


class DeviceUnavailableError(ClipsearchError):
    """The requested compute device does not exist on this machine."""


class ModelMismatchError(ClipsearchError):
    """A namespace holds vectors of a different model than the one asked for.

    ``stored`` made the namespace's vectors; ``requested`` is the model in use. Their vectors
    live in different spaces: comparing or mixing them gives meaningless rankings.
    """

    def __init__(
        self, namespace: str, stored: ModelIdentity, requested: ModelIdentity, reasons: list[str] | None = None
    ):
        self.namespace = namespace
        self.stored = stored
        self.requested = requested
        self.reasons = reasons if reasons is not None else stored.differences(requested)
        super().__init__(
            f"namespace {namespace!r} holds vectors of {stored.describe()}, but the model in use is "
            f"{requested.describe()} ({'; '.join(self.reasons)}); use the same model, "
            "or another namespace"
        )


class MemoryLockError(ClipsearchError):
    """Vectors asked to stay in memory (``CLIPSEARCH_LOCK_VECTORS``) could not be locked there.

    ``path``: their file; ``size``: its bytes; ``limit``: this process's locked-memory limit in
    bytes (None: unlimited, or no such limit on this platform); ``reason``: what the system said.
    """

    exit_code = 1

    def __init__(self, path: str, size: int, limit: int | None, reason: str):
        self.path, self.size, self.limit, self.reason = path, size, limit, reason
        what = f"cannot keep the {_size(size)} of vectors in {path} in memory (CLIPSEARCH_LOCK_VECTORS): {reason}"
        if limit is None:
            fix = "free memory for them, or leave CLIPSEARCH_LOCK_VECTORS unset"
        else:
            fix = (
                f"this process may lock {_size(limit)}; raise that limit (ulimit -l unlimited; LimitMEMLOCK=infinity "
                "under systemd; docker run --ulimit memlock=-1) or leave CLIPSEARCH_LOCK_VECTORS unset"
            )
        super().__init__(f"{what}; {fix}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


class DimensionError(ClipsearchError):
    """A vector has the wrong length for the namespace or model."""


class UsageError(ClipsearchError):
    """Bad arguments: an unknown source, namespace name, option value..."""


class NotFoundError(ClipsearchError):
    """An item, namespace or file that does not exist."""


class NoDatabaseError(NotFoundError):
    """A command that only reads was pointed at a SQLite file that does not exist."""

    def __init__(self, location: str):
        self.location = location
        super().__init__(f"no database at {location}; ingest something into it first, or give another database")


class NamespaceNotFoundError(NotFoundError):
    """The namespace has no vectors (nothing was ever ingested into it) in this store."""

    def __init__(self, namespace: str, location: str, hint: str = ""):
        self.namespace = namespace
        self.location = location
        super().__init__(f"namespace {namespace!r} does not exist in {location}{hint}")


class ItemNotFoundError(NotFoundError):
    """No item with this id in the namespace."""

    def __init__(self, item_id: str, namespace: str):
        self.item_id = item_id
        self.namespace = namespace
        super().__init__(f"no item {item_id!r} in namespace {namespace!r}")


class StorageError(ClipsearchError):
    """The disk under a database failed a read or a write, is full, or holds a damaged file.

    ``path``: the database; ``code``: SQLite's name for it (``SQLITE_IOERR_WRITE``,
    ``SQLITE_FULL``, ``SQLITE_CORRUPT``...); ``reason``: what SQLite said; ``rolled_back``: it
    failed a transaction, which was rolled back (the transactions an operation committed before it
    stay: an import commits 10,000 rows at a time).
    """

    exit_code = 1

    def __init__(self, path: str, code: str, reason: str, rolled_back: bool):
        self.path, self.code, self.reason, self.rolled_back = path, code, reason, rolled_back
        kept = "; the transaction in progress was rolled back" if rolled_back else ""
        if code.startswith("SQLITE_FULL"):
            fix = "free some space there and run it again"
        elif code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            fix = "the file is damaged: restore it from a backup, or build it again from its sources"
        elif code == "SQLITE_IOERR_SHORT_READ":
            # what a write-ahead log removed under a reader looks like: another process believed
            # itself the last user, because this one's locks were let go by a descriptor of the
            # database closed outside SQLite (POSIX drops all of a process's locks on a file then)
            fix = (
                "its write-ahead log ended early, as when another process removed it, believing no one "
                "else had the database open (a program that opens and closes the database's files beside "
                "SQLite in this process lets go of its locks); open the store again"
            )
        else:
            fix = "see what the system logged about that disk (dmesg), then run it again"
        super().__init__(f"the database {path} could not be read or written: {reason} ({code}){kept}; {fix}")


class ImageError(ClipsearchError):
    """An input could not be turned into an image; the message is the recorded reason."""

    exit_code = 1


class TooLargeError(ImageError):
    """An image, download or request over a configured size limit."""


class FetchError(ImageError):
    """An image URL could not be fetched (HTTP status, timeout, connection, not an image).

    ``retryable`` marks failures that may pass on a later attempt: timeouts, broken
    connections, 5xx and 429 answers. A 404 or an HTML page will not.
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class ForbiddenURLError(FetchError):
    """A URL the server refuses to fetch: not http(s), or pointing at a private address."""


# (pattern in a recorded failure reason, the kind it counts as): the reasons are the library's own
# words (fetch, decode, catalog), so that a run's failures can be counted by what to do about them
_FAILURE_KINDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"answered HTTP (\d{3})"), r"HTTP \1"),
    (re.compile(r"not cached \(the run was"), "not cached (offline run)"),
    (re.compile(r"timed out"), "timed out"),
    (re.compile(r"cannot resolve host"), "host not found"),
    (re.compile(r"cannot connect"), "cannot connect"),
    (re.compile(r"closed the connection|connection broke|truncated \w+ body"), "connection broken mid-body"),
    (re.compile(r"redirected"), "bad redirect"),
    (re.compile(r"refusing to fetch"), "URL refused"),
    (re.compile(r"larger than|over the .* limit|too large"), "too large"),
    (re.compile(r"not an image|Content-Encoding"), "not an image"),
    (re.compile(r"^(?:line|data row) \d+ has no (\S+)"), r"no \1"),
    (re.compile(r"does not exist|is a directory|cannot read"), "file missing or unreadable"),
    (re.compile(r"empty file|truncated|corrupt|unreadable|decoder process crashed"), "broken image"),
    (re.compile(r"out of memory"), "out of memory"),
]


def count_failure_kinds(reasons: Iterable[str]) -> dict[str, int]:
    """How many of ``reasons`` are of each kind (``failure_kind``), most first."""
    return dict(Counter(map(failure_kind, reasons)).most_common())


def failure_kind(reason: str) -> str:
    """What kind of failure a recorded reason is (``HTTP 404``, ``timed out``, ``not an image``,
    ``broken image``, ...), for counts by kind; ``other`` for a reason of no known kind."""
    for pattern, kind in _FAILURE_KINDS:
        found = pattern.search(reason)
        if found:
            return found.expand(kind)
    return "other"
