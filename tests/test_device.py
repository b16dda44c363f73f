"""Device identity proof (clawgate.protocol.device), checked against OpenClaw's rules."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clawgate.errors import InvalidRequest, Unauthorized
from clawgate.protocol.device import (
    DEVICE_SIGNATURE_SKEW_MS,
    b64url_encode,
    build_device_payload_v2,
    build_device_payload_v3,
    derive_device_id,
    signature_token,
    verify_device_signature,
)

NOW = 1_795_599_736_374
NONCE = "c32bb513-d136-4ba8-a233-67daad167921"
CLIENT = {"client_id": "cli", "client_mode": "cli", "platform": "linux", "device_family": "Linux"}


def _identity() -> tuple[Ed25519PrivateKey, str, str]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return key, b64url_encode(raw), hashlib.sha256(raw).hexdigest()


def _signed_device(
    *,
    scopes: list[str],
    token: str | None,
    nonce: str = NONCE,
    signed_at: int = NOW,
    version: str = "v3",
) -> tuple[dict[str, Any], Ed25519PrivateKey]:
    key, public_key, device_id = _identity()
    common: dict[str, Any] = {
        "device_id": device_id,
        "client_id": "cli",
        "client_mode": "cli",
        "role": "operator",
        "scopes": scopes,
        "signed_at_ms": signed_at,
        "token": token,
        "nonce": nonce,
    }
    if version == "v3":
        payload = build_device_payload_v3(**common, platform="linux", device_family="Linux")
    else:
        payload = build_device_payload_v2(**common)
    signature = b64url_encode(key.sign(payload.encode("utf-8")))
    device = {
        "id": device_id,
        "publicKey": public_key,
        "signature": signature,
        "signedAt": signed_at,
        "nonce": nonce,
    }
    return device, key


def _verify(device: dict[str, Any], **overrides: Any) -> None:
    kwargs: dict[str, Any] = {
        **CLIENT,
        "role": "operator",
        "scopes": ["operator.read", "operator.write"],
        "token": "secret",
        "nonce": NONCE,
        "now_ms": NOW + 1_000,
    }
    kwargs.update(overrides)
    verify_device_signature(device, **kwargs)


def test_payload_v3_matches_openclaw_format() -> None:
    payload = build_device_payload_v3(
        device_id="dev",
        client_id="cli",
        client_mode="cli",
        role="operator",
        scopes=["operator.read", "operator.write"],
        signed_at_ms=1737264000000,
        token=None,
        nonce="n-1",
        platform="  Linux ",
        device_family="MacBookPro",
    )
    assert (
        payload == "v3|dev|cli|cli|operator|operator.read,operator.write|1737264000000||n-1|linux|macbookpro"
    )


def test_payload_v2_has_nine_fields() -> None:
    payload = build_device_payload_v2(
        device_id="d",
        client_id="c",
        client_mode="m",
        role="operator",
        scopes=[],
        signed_at_ms=5,
        token="t",
        nonce="n",
    )
    assert payload == "v2|d|c|m|operator||5|t|n"


def test_signature_token_precedence() -> None:
    assert signature_token(None) is None
    assert signature_token({"token": "a", "deviceToken": "b"}) == "a"
    assert signature_token({"deviceToken": "b", "bootstrapToken": "c"}) == "b"
    assert signature_token({"bootstrapToken": "c"}) == "c"


def test_valid_v3_signature_verifies() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    _verify(device)


def test_v2_payload_is_still_accepted() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret", version="v2")
    _verify(device)


def test_platform_case_does_not_matter_but_value_does() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    _verify(device, platform="LINUX", device_family="linux")
    with pytest.raises(Unauthorized, match="signature invalid"):
        _verify(device, platform="darwin")


def test_device_id_from_pem_and_raw_key_agree() -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert derive_device_id(pem) == derive_device_id(b64url_encode(raw)) == hashlib.sha256(raw).hexdigest()
    # padded standard base64 is accepted too, as OpenClaw does
    assert derive_device_id(base64.b64encode(raw).decode()) == hashlib.sha256(raw).hexdigest()


def test_real_openclaw_cli_vector() -> None:
    """A connect `device` block sent by the real OpenClaw 2026.9.6 CLI (`openclaw agent`, auth mode none)."""
    device: dict[str, Any] = {
        "id": "f04a0a92c9a390d638cfe94317869d2ba458814e35b87d4b74c487e49b386b6a",
        "publicKey": "SVnZRrgt3C1LAXJIHIaHeKhRkhOh0G9jLQNU2iEGXfc",
        "signature": "rogrRwPGOQPsuBTByz1tBHI3KTaadfhmmeUSpVOOOFim5r-j0kwnFqrIwKy1dwJY4IVpQKyEa9aXMDGf-2Q_BA",
        "signedAt": 1795599736374,
        "nonce": NONCE,
    }
    assert derive_device_id(device["publicKey"]) == device["id"]
    verify_device_signature(
        device,
        client_id="cli",
        client_mode="cli",
        role="operator",
        scopes=["operator.admin"],
        token=None,
        nonce=NONCE,
        now_ms=1795599736374 + 50,
        platform="linux",
        device_family="Linux",
    )
    with pytest.raises(Unauthorized):
        verify_device_signature(
            device,
            client_id="cli",
            client_mode="cli",
            role="operator",
            scopes=["operator.read"],
            token=None,
            nonce=NONCE,
            now_ms=1795599736374,
            platform="linux",
            device_family="Linux",
        )


def test_tampered_signature_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    sig = bytearray(base64.urlsafe_b64decode(device["signature"] + "=="))
    sig[0] ^= 0x01
    device["signature"] = b64url_encode(bytes(sig))
    with pytest.raises(Unauthorized, match="signature invalid") as info:
        _verify(device)
    assert info.value.code == "UNAUTHORIZED"
    assert info.value.details == {"code": "DEVICE_AUTH_SIGNATURE_INVALID", "reason": "device-signature"}


def test_signature_over_other_token_or_scopes_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    with pytest.raises(Unauthorized, match="signature invalid"):
        _verify(device, token="other")
    with pytest.raises(Unauthorized, match="signature invalid"):
        _verify(device, scopes=["operator.admin"])


def test_garbage_signature_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read"], token=None)
    device["signature"] = "!!!not-base64!!!"
    with pytest.raises(Unauthorized):
        _verify(device, scopes=["operator.read"], token=None)


def test_wrong_nonce_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    with pytest.raises(Unauthorized, match="nonce mismatch") as info:
        _verify(device, nonce="another-challenge")
    assert info.value.details is not None
    assert info.value.details["code"] == "DEVICE_AUTH_NONCE_MISMATCH"


def test_missing_nonce_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    device["nonce"] = "   "
    with pytest.raises(Unauthorized, match="nonce required"):
        _verify(device)


@pytest.mark.parametrize("offset", [DEVICE_SIGNATURE_SKEW_MS + 1, -(DEVICE_SIGNATURE_SKEW_MS + 1), 10**9])
def test_skewed_time_is_unauthorized(offset: int) -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    with pytest.raises(Unauthorized, match="expired") as info:
        _verify(device, now_ms=NOW + offset)
    assert info.value.details is not None
    assert info.value.details["code"] == "DEVICE_AUTH_SIGNATURE_EXPIRED"


def test_skew_boundary_is_inclusive() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    _verify(device, now_ms=NOW + DEVICE_SIGNATURE_SKEW_MS)
    _verify(device, now_ms=NOW - DEVICE_SIGNATURE_SKEW_MS)
    with pytest.raises(Unauthorized):
        _verify(device, now_ms=NOW + 10, max_skew_ms=5)


def test_id_not_matching_key_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    _, other_key, _ = _identity()
    device["publicKey"] = other_key
    with pytest.raises(Unauthorized, match="identity mismatch") as info:
        _verify(device)
    assert info.value.details is not None
    assert info.value.details["code"] == "DEVICE_AUTH_DEVICE_ID_MISMATCH"


def test_id_checked_before_signature() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    device["id"] = "0" * 64
    with pytest.raises(Unauthorized, match="identity mismatch"):
        _verify(device)


def test_unreadable_public_key_is_unauthorized() -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    device["publicKey"] = b64url_encode(b"short")
    with pytest.raises(Unauthorized, match="identity mismatch"):
        _verify(device)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("publicKey", 5),
        ("signature", None),
        ("signedAt", "123"),
        ("signedAt", True),
        ("signedAt", -1),
    ],
)
def test_malformed_device_is_invalid_request(field: str, value: Any) -> None:
    device, _ = _signed_device(scopes=["operator.read", "operator.write"], token="secret")
    device[field] = value
    with pytest.raises(InvalidRequest) as info:
        _verify(device)
    assert info.value.details == {"field": f"device.{field}"}
