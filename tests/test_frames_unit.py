"""The pure frame functions (clawgate.protocol.frames), example by example: no socket, no loop.

The fuzz tests (test_fuzz_frames.py) show decoding never fails the wrong way; these pin the
exact answers: the maxPayload boundary, the field named in each error, which ids are echoed
(the regex fallback for frames that are not JSON, the 256-character cap, the 4096-character
window it reads), and the bytes each encoder writes.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from clawgate.errors import InvalidRequest, PayloadTooLarge
from clawgate.protocol.frames import (
    decode_params,
    decode_request,
    encode,
    encode_error,
    encode_event,
    encode_response,
    probe_id,
)

HEALTH = '{"type":"req","id":"h1","method":"health"}'


class Inner(msgspec.Struct):
    a: int
    b: list[int] = []
    extra: Any = None


class Outer(msgspec.Struct):
    inner: Inner


def invalid(data: str | bytes, max_bytes: int = 1 << 20) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_request(data, max_bytes)
    assert info.value.code == "INVALID_REQUEST"
    return info.value


def invalid_params(raw: bytes, schema: type[Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_params(msgspec.Raw(raw), schema)
    return info.value


# -- maxPayload ------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_bytes", [False, True])
def test_a_frame_of_exactly_max_payload_bytes_is_accepted(as_bytes: bool) -> None:
    size = len(HEALTH.encode())
    data: str | bytes = HEALTH.encode() if as_bytes else HEALTH
    frame = decode_request(data, size)
    assert (frame.type, frame.id, frame.method) == ("req", "h1", "health")
    with pytest.raises(PayloadTooLarge) as info:
        decode_request(data, size - 1)
    assert info.value.details == {"maxPayload": size - 1, "size": size}
    assert info.value.message == f"frame of {size} bytes exceeds maxPayload {size - 1}"


def test_a_text_frame_is_measured_in_utf8_bytes_not_characters() -> None:
    text = '{"type":"req","id":"é€😀","method":"health"}'
    size = len(text.encode("utf-8"))
    assert size == len(text) + 1 + 2 + 3
    assert decode_request(text, size).id == "é€😀"
    with pytest.raises(PayloadTooLarge) as info:
        decode_request(text, len(text))  # enough characters, not enough bytes
    assert info.value.details == {"maxPayload": len(text), "size": size}


# -- decode_request errors name the field ----------------------------------------------------------
@pytest.mark.parametrize("field", ["type", "id", "method"])
def test_a_missing_required_field_is_named(field: str) -> None:
    frame = {"type": "req", "id": "1", "method": "health"}
    del frame[field]
    err = invalid(json.dumps(frame))
    assert err.details == {"field": field}
    assert f"missing required field `{field}`" in err.message


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "req", "id": 1, "method": "health"}, "id"),
        ({"type": "res", "id": "1", "method": "health"}, "type"),
        ({"type": "req", "id": "1", "method": ["health"]}, "method"),
        ([1, 2], "frame"),
        ("req", "frame"),
    ],
)
def test_a_wrong_shape_names_the_field(frame: Any, field: str) -> None:
    err = invalid(json.dumps(frame))
    assert err.details == {"field": field}
    assert err.message.startswith("invalid frame: ")


@pytest.mark.parametrize("data", ["{", "", "not json", b"\xff\xfe{", '{"type":"req",}'])
def test_malformed_json_has_no_field(data: str | bytes) -> None:
    err = invalid(data)
    assert err.details is None
    assert err.message.startswith("malformed JSON: ")


def test_nesting_too_deep_is_malformed_json() -> None:
    deep = "[" * 5000 + "]" * 5000
    err = invalid(f'{{"type":"req","id":"d","method":"x","params":{{"a":{deep}}}}}')
    assert err.message.startswith("malformed JSON")


# -- probe_id --------------------------------------------------------------------------------------
def test_probe_id_reads_the_id_of_any_json_object() -> None:
    assert probe_id('{"id":"abc","type":1}') == "abc"
    assert probe_id(b'{"method":7,"id":"xyz"}') == "xyz"
    assert probe_id('{"id":""}') == ""


@pytest.mark.parametrize(
    "data", ['{"id":12}', '{"id":null}', '{"id":["a"]}', '{"type":"req"}', "[1]", '"id"']
)
def test_probe_id_echoes_no_id_that_is_not_a_string(data: str) -> None:
    assert probe_id(data) is None


def test_probe_id_caps_the_echoed_id_at_256_characters() -> None:
    assert probe_id(json.dumps({"id": "x" * 256})) == "x" * 256
    assert probe_id(json.dumps({"id": "x" * 257})) is None
    # The fallback for frames that are not JSON has the same cap.
    assert probe_id('{"id":"' + "y" * 256 + '", "params": {') == "y" * 256
    assert probe_id('{"id":"' + "y" * 257 + '", "params": {') is None


@pytest.mark.parametrize("as_bytes", [False, True])
def test_probe_id_recovers_a_leading_id_from_a_frame_that_is_not_json(as_bytes: bool) -> None:
    truncated = '{"type":"req","id":"cut-7","method":"agent","params":{"message":"unfinish'
    deep = '{ "method" : "health" , "id" : "deep-1", "params":' + "[" * 5000 + "]" * 5000 + "}"
    for data, expected in ((truncated, "cut-7"), (deep, "deep-1")):
        assert probe_id(data.encode() if as_bytes else data) == expected


@pytest.mark.parametrize(
    "data",
    [
        '{"params":{"id":"inner"},',  # an id that is not a top-level leading field
        '{"type":"req","id":"esc\\"aped",',  # an escaped quote: not echoed half-read
        '{"type":"' + "t" * 65 + '","id":"x",',  # a leading field longer than 64 characters
        '{"id":12,',
        "garbage",
    ],
)
def test_probe_id_fallback_echoes_only_a_plain_leading_id(data: str) -> None:
    assert probe_id(data) is None


@pytest.mark.parametrize("as_bytes", [False, True])
def test_probe_id_fallback_reads_only_the_first_4096_characters(as_bytes: bool) -> None:
    def frame(pad: int) -> str:
        return " " * pad + '{"id":"late"'  # not JSON: no closing brace

    ends_at_4096 = 4096 - len(frame(0))
    fits, too_far = frame(ends_at_4096), frame(ends_at_4096 + 1)
    assert len(fits) == 4096  # its id's closing quote is the 4096th character
    assert probe_id(fits.encode() if as_bytes else fits) == "late"
    assert probe_id(too_far.encode() if as_bytes else too_far) is None


def test_probe_id_fallback_on_invalid_utf8_bytes() -> None:
    assert probe_id(b'{"id":"ok-1","params":"\xff\xfe') == "ok-1"
    assert probe_id(b"\xff\xfe") is None


# -- decode_params ---------------------------------------------------------------------------------
def test_decode_params_returns_the_struct() -> None:
    assert decode_params(msgspec.Raw(b'{"a":1,"b":[2]}'), Inner) == Inner(a=1, b=[2])


@pytest.mark.parametrize(
    ("raw", "schema", "field"),
    [
        (b"{}", Inner, "params.a"),  # a missing required field is named under params
        (b"{}", Outer, "params.inner"),
        (b'{"a":"x"}', Inner, "params.a"),
        (b'{"a":1,"b":[1,"x"]}', Inner, "params.b[1]"),
        (b'{"inner":{}}', Outer, "params.inner"),
        (b"5", Inner, "params"),
        (b"[1]", Inner, "params"),
    ],
)
def test_invalid_params_name_the_field(raw: bytes, schema: type[Any], field: str) -> None:
    err = invalid_params(raw, schema)
    assert err.details == {"field": field}
    assert err.message.startswith("invalid params: ")


@pytest.mark.parametrize("raw", [b'{"a":', b"{,}", b"nope"])
def test_params_that_are_not_json_name_params(raw: bytes) -> None:
    err = invalid_params(raw, Inner)
    assert err.details == {"field": "params"}
    assert err.message.startswith("invalid params: ")


def test_params_nested_too_deep_name_params() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    err = invalid_params(b'{"a":1,"extra":' + deep + b"}", Inner)
    assert err.details == {"field": "params"}
    assert err.message == "invalid params: nested too deeply"


# -- encoders --------------------------------------------------------------------------------------
def test_encode_response() -> None:
    data = encode_response("r1", {"a": [1, "x"]})
    assert data == b'{"type":"res","id":"r1","ok":true,"payload":{"a":[1,"x"]}}'


def test_encode_error_with_and_without_an_id() -> None:
    err = {"code": "INVALID_REQUEST", "message": "m", "details": {"field": "id"}}
    assert json.loads(encode_error("r2", err)) == {"type": "res", "id": "r2", "ok": False, "error": err}
    assert encode_error(None, {"code": "X"}) == b'{"type":"res","id":null,"ok":false,"error":{"code":"X"}}'


def test_encode_event_with_and_without_seq() -> None:
    assert encode_event("tick", {"ts": 1}) == b'{"type":"event","event":"tick","payload":{"ts":1}}'
    assert encode_event("agent", None, seq=0) == b'{"type":"event","event":"agent","payload":null,"seq":0}'
    assert json.loads(encode_event("agent", [], seq=7))["seq"] == 7


def test_encode_plain_object() -> None:
    assert encode({"x": [1, None]}) == b'{"x":[1,null]}'
