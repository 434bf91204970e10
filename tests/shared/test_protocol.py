"""Request models check what they can without the model: shapes, starts, rows, logits modes."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from shared.codec import pack, unpack_raw
from shared.protocol import RepresentRequest, SessionOpenRequest, SessionStepRequest, WireTensor


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sequences": []}, "at least 1"),
        ({"sequences": [[]]}, "at least 1"),
        ({"sequences": [[1, -1]]}, "greater than or equal to 0"),
        ({"sequences": [[1, 2]], "start": [2]}, r"start\[0\] = 2 must be in \[0, 1\]"),
        ({"sequences": [[1, 2]], "start": [0, 0]}, "start has 2 entries"),
        ({"sequences": [[1]], "dtype": "float64"}, "dtype"),
        ({"sequences": [[1]], "logits": "some"}, "logits"),
        ({"sequences": [[1]], "logits": 0}, "logits"),
        ({"sequences": [[1]], "extra": 1}, "Extra inputs"),
    ],
)
def test_represent_request_rejects(body, message):
    with pytest.raises(ValidationError, match=message):
        RepresentRequest.model_validate(body)


def test_represent_request_defaults():
    request = RepresentRequest(sequences=[[5, 6], [7]])
    assert request.starts() == [0, 0]
    assert (request.dtype, request.logits) == ("float32", "none")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tokens": [1, 2], "rows": [0]}, "rows has 1 entries but tokens has 2"),
        ({"tokens": [1, 2], "rows": [0, 0]}, "must not repeat"),
        ({"tokens": []}, "at least 1"),
    ],
)
def test_step_request_rejects(body, message):
    with pytest.raises(ValidationError, match=message):
        SessionStepRequest.model_validate(body)


def test_json_bytes_are_standard_base64_and_both_alphabets_are_read() -> None:
    """JSON tensor bytes use the alphabet ``base64.b64decode`` reads; URL-safe input works too."""
    raw = b"\xfb\xff\xfb\xff\xfe\xff"  # encodes to '+' and '/' in the standard alphabet
    wire = WireTensor(dtype="float16", shape=[3], data=raw)
    text = json.loads(wire.model_dump_json())["data"]
    assert text == base64.b64encode(raw).decode() == "+//7//7/"
    for encoded in (text, base64.urlsafe_b64encode(raw).decode()):
        body = {"dtype": "float16", "shape": [3], "data": encoded}
        assert WireTensor.model_validate_json(json.dumps(body)).data == raw


def test_requests_without_the_newer_options_are_what_older_servers_accept():
    """Options added to the protocol since version 1 (session forks, openings returning every
    position) are not sent unless used: servers older than them refuse unknown fields."""
    opening = unpack_raw(pack(SessionOpenRequest(sequences=[[5, 6]])))
    assert set(opening) == {"sequences", "dtype", "logits"}
    assert set(unpack_raw(pack(SessionStepRequest(tokens=[5])))) == {"tokens", "logits"}
    assert unpack_raw(pack(SessionOpenRequest(sequences=[[5]], positions="all")))["positions"]
