"""User-facing errors: each carries one line that says what is wrong and what to do.

The CLI prints ``error: <message>`` and exits with ``exit_code``; the HTTP API maps them to JSON
errors. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ClipsearchError(Exception):
    """An error the user can fix; ``str(err)`` is the one-line explanation."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MissingWeightsError(ClipsearchError):
    """The model's weights are neither cached nor downloadable."""


class DeviceUnavailableError(ClipsearchError):
    """The requested compute device does not exist on this machine."""


class ModelMismatchError(ClipsearchError):
    """A namespace holds vectors of a different model than the one asked for."""


class DimensionError(ClipsearchError):
    """A vector has the wrong length for the namespace or model."""


class UsageError(ClipsearchError):
    """Bad arguments: an unknown source, namespace name, option value..."""


class NotFoundError(ClipsearchError):
    """An item, namespace or file that does not exist."""


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
