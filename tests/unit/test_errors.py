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
