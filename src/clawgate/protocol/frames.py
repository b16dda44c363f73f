"""Frame shapes and the pure decode/encode functions of the wire protocol (docs/protocol.md).

Decoding never raises anything but `InvalidRequest`, whose details name the
field at fault; it never touches a socket, so it is fuzzed directly.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec

from clawgate.errors import InvalidRequest, PayloadTooLarge


class RequestFrame(msgspec.Struct, frozen=True):
    type: Literal["req"]
    id: str
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")


class _IdProbe(msgspec.Struct):
    id: Any = None


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(RequestFrame)
_probe_decoder = msgspec.json.Decoder(_IdProbe)
_ID_RE = re.compile(r'\s*\{(?:\s*"(?:type|method)"\s*:\s*"[^"\\]{0,64}"\s*,)*\s*"id"\s*:\s*"([^"\\]{1,256})"')
_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")

P = TypeVar("P")


def decode_request(data: str | bytes, max_bytes: int) -> RequestFrame:
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"frame of {size} bytes exceeds maxPayload {max_bytes}",
            details={"maxPayload": max_bytes, "size": size},
        )
    try:
        return _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid frame: {exc}", details=_details(exc)) from None
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        # msgspec gives up on nesting deeper than ~1000 levels, which fits well inside maxPayload.
        raise InvalidRequest("malformed JSON: nested too deeply") from None


def probe_id(data: str | bytes) -> str | None:
    """Best effort: the `id` of a frame that failed validation, to echo it in the error."""
    try:
        value = _probe_decoder.decode(data).id
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError):
        # Too deep or not JSON at all: a top-level `"id": "..."` near the start may still be readable.
        head = data[:4096] if isinstance(data, str) else data[:4096].decode("utf-8", "replace")
        match = _ID_RE.match(head)
        return match.group(1) if match else None
    return value if isinstance(value, str) and len(value) <= 256 else None


def decode_params(raw: msgspec.Raw, schema: type[P]) -> P:
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid params: {exc}", details=_details(exc, prefix="params")) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"invalid params: {exc}", details={"field": "params"}) from None
    except RecursionError:
        raise InvalidRequest("invalid params: nested too deeply", details={"field": "params"}) from None


def _details(exc: msgspec.ValidationError, prefix: str = "") -> dict[str, Any]:
    match = _PATH_RE.search(str(exc))
    path = match.group(1) if match else ""
    if not path:
        field = prefix or "frame"
        missing = re.search(r"missing required field `([^`]+)`", str(exc))
        if missing:
            field = f"{prefix}.{missing.group(1)}" if prefix else missing.group(1)
        return {"field": field}
    return {"field": f"{prefix}.{path}" if prefix else path}


def encode_response(req_id: str, payload: Any) -> bytes:
    return _encoder.encode({"type": "res", "id": req_id, "ok": True, "payload": payload})


def encode_error(req_id: str | None, error: dict[str, Any]) -> bytes:
    return _encoder.encode({"type": "res", "id": req_id, "ok": False, "error": error})


def encode_event(event: str, payload: Any, seq: int | None = None) -> bytes:
    if seq is None:
        return _encoder.encode({"type": "event", "event": event, "payload": payload})
    return _encoder.encode({"type": "event", "event": event, "payload": payload, "seq": seq})


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)
