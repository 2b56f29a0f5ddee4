"""Library errors name arguments once, as the Python API does; each face words them its way."""

from __future__ import annotations

import pytest

from clipsearch import IngestOptions, UsageError
from clipsearch.cli._common import word
from clipsearch.encoders import check_runtime
from clipsearch.errors import option
from clipsearch.identity import ModelSpec


def test_a_message_names_arguments_per_face():
    e = UsageError(f"{option('precision')} int8 needs {option('runtime')} onnx", param="precision")
    assert str(e) == "precision int8 needs runtime onnx"  # Python: the keyword's name
    assert word(e) == "--precision int8 needs --runtime onnx"  # the command line: its flags
    assert e.worded() == str(e)  # HTTP: the request field, which is the Python name
    # param is appended only where the message does not name it already
    assert word(UsageError("must be at least 1", param="batch_size")) == "must be at least 1 (--batch-size)"
    assert word(UsageError("bad filter", param="filters")) == "bad filter (--filter)"


def test_the_library_never_writes_a_flag():
    with pytest.raises(UsageError) as e:
        check_runtime(ModelSpec(runtime="onnx", device="cuda"))
    assert "--" not in str(e.value)
    assert word(e.value) == "--runtime onnx runs on the CPU; use --runtime torch for --device cuda"


def test_ingest_options_are_checked_when_made():
    with pytest.raises(UsageError, match="unknown worker type 'fibers'") as e:
        IngestOptions(worker_type="fibers")
    assert word(e.value).endswith("(--worker-type)")
    with pytest.raises(UsageError, match="batch_size must be at least 1"):
        IngestOptions(batch_size=0)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("http://x/a.jpg: answered HTTP 404", "HTTP 404"),
        ("http://x/a.jpg answered HTTP 503 (gave up after 4 attempts in 9 s)", "HTTP 503"),
        ("http://x/a.jpg: timed out after 20 s", "timed out"),
        (
            "http://x/a.jpg: the server closed the connection before the whole response arrived",
            "connection broken mid-body",
        ),
        ("http://x/a.jpg is not an image (content-type text/html)", "not an image"),
        ("http://x/a.jpg is 9000000 bytes, over the 1 MiB limit", "too large"),
        ("http://x/a.jpg redirected more than 3 times", "bad redirect"),
        ("cannot resolve host 'x' (Name or service not known)", "host not found"),
        ("http://x/a.jpg: cannot connect (All connection attempts failed)", "cannot connect"),
        ("line 13 has no image_url", "no image_url"),
        ("data row 7 has no product_id", "no product_id"),
        ("not cached (the run was --offline)", "not cached (offline run)"),
        ("corrupt image data (broken data stream)", "broken image"),
        ("file does not exist", "file missing or unreadable"),
        ("something nobody wrote yet", "other"),
    ],
)
def test_failure_kinds_name_what_to_do(reason, kind):
    from clipsearch.errors import failure_kind

    assert failure_kind(reason) == kind


def test_http_words_a_missing_extra_as_the_servers_lack():
    """A request the server's own install cannot serve (an HNSW index asked for by its settings,
    without FAISS) is 501, not a client error."""
    from clipsearch.errors import MissingExtraError
    from clipsearch.server.app import _status

    lack = MissingExtraError("an HNSW or IVF-PQ index (FAISS)", "faiss")
    assert _status(lack) == (501, "server_error", "missing_extra")
    assert _status(UsageError("no")) == (400, "invalid_request_error", None)
