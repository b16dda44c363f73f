"""Device identity proof of a `connect` request, as the OpenClaw gateway checks it.

A client that holds an Ed25519 device key adds to its connect params

    "device": {"id", "publicKey", "signature", "signedAt", "nonce"}

where (OpenClaw 2026.9.6, see docs/openclaw-wire-notes.md):

* `publicKey` is the raw 32-byte Ed25519 public key, base64url without padding
  (the gateway also takes a PEM SPKI key, or padded / standard base64);
* `id` is the lowercase hex SHA-256 of those 32 raw bytes;
* `nonce` is the `connect.challenge` nonce; `signedAt` is milliseconds since the
  epoch (OpenClaw clients use the challenge `ts`), within 2 minutes of the
  gateway's clock;
* `signature` is the Ed25519 signature, base64url, of the UTF-8 "v3" payload

      v3|deviceId|clientId|clientMode|role|scopes|signedAtMs|token|nonce|platform|deviceFamily

  with `scopes` joined by ",", `token` the connect `auth.token` (else
  `auth.deviceToken`, else `auth.bootstrapToken`, else ""), and `platform` /
  `deviceFamily` from `client`, trimmed and ASCII-lowercased ("" when absent).
  The gateway still accepts the older "v2" payload (the first nine fields,
  with "v2" in front) when the v3 one does not verify.

These functions are pure: the caller passes the challenge nonce and the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from clawgate.clip import clip
from clawgate.errors import InvalidRequest, Unauthorized

# OpenClaw: src/gateway/server/ws-connection/connect-device-proof.ts
DEVICE_SIGNATURE_SKEW_MS = 2 * 60 * 1000
# OpenClaw: src/infra/ed25519-signature.ts (MAX_BASE64URL_DECODE_INPUT_LENGTH)
_MAX_B64_INPUT = 4096
_ED25519_RAW_KEY_LEN = 32

# `details.code` values OpenClaw puts on a rejected device proof
# (packages/gateway-protocol/src/connect-error-details.ts).
_DETAIL_CODES = {
    "device-id-mismatch": "DEVICE_AUTH_DEVICE_ID_MISMATCH",
    "device-signature-stale": "DEVICE_AUTH_SIGNATURE_EXPIRED",
    "device-nonce-missing": "DEVICE_AUTH_NONCE_REQUIRED",
    "device-nonce-mismatch": "DEVICE_AUTH_NONCE_MISMATCH",
    "device-signature": "DEVICE_AUTH_SIGNATURE_INVALID",
    "device-public-key": "DEVICE_AUTH_PUBLIC_KEY_INVALID",
}


def normalize_device_metadata(value: str | None) -> str:
    """Trim and lowercase A-Z only (OpenClaw's `normalizeDeviceMetadataForAuth`)."""
    if not isinstance(value, str):
        return ""
    return value.strip().translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def build_device_payload_v3(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    signed_at_ms: int,
    token: str | None,
    nonce: str,
    platform: str | None = None,
    device_family: str | None = None,
) -> str:
    """The string an OpenClaw client signs (`buildDeviceAuthPayloadV3`)."""
    return "|".join(
        [
            "v3",
            device_id,
            client_id,
            client_mode,
            role,
            ",".join(scopes),
            str(signed_at_ms),
            token or "",
            nonce,
            normalize_device_metadata(platform),
            normalize_device_metadata(device_family),
        ]
    )


def build_device_payload_v2(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    signed_at_ms: int,
    token: str | None,
    nonce: str,
) -> str:
    """The legacy payload the OpenClaw gateway still accepts (`buildDeviceAuthPayload`)."""
    return "|".join(
        [
            "v2",
            device_id,
            client_id,
            client_mode,
            role,
            ",".join(scopes),
            str(signed_at_ms),
            token or "",
            nonce,
        ]
    )


def signature_token(auth: Mapping[str, Any] | None) -> str | None:
    """The credential that goes into the signed payload: token, else deviceToken, else bootstrapToken."""
    if not auth:
        return None
    for key in ("token", "deviceToken", "bootstrapToken"):
        value = auth.get(key)
        if isinstance(value, str):
            return value
    return None


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Permissive decode like OpenClaw's: base64url or base64, padded or not."""
    if len(text) > _MAX_B64_INPUT:
        raise ValueError("base64 input too long")
    normalized = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    return base64.urlsafe_b64decode(normalized + "=" * (-len(normalized) % 4))


def public_key_raw(public_key: str) -> bytes:
    """The 32 raw key bytes from a base64(url) raw key or a PEM SPKI Ed25519 key."""
    if "BEGIN" in public_key:
        # Imported here: `cryptography` costs megabytes of RSS and a good part of the start
        # time, and a gateway whose clients send no device identity never needs it.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(public_key.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key.public_bytes_raw()
    raw = b64url_decode(public_key)
    if len(raw) != _ED25519_RAW_KEY_LEN:
        raise ValueError(f"Ed25519 public key must be {_ED25519_RAW_KEY_LEN} bytes, got {len(raw)}")
    return raw


def derive_device_id(public_key: str) -> str:
    """Lowercase hex SHA-256 of the raw public key (`deriveDeviceIdFromPublicKey`)."""
    return hashlib.sha256(public_key_raw(public_key)).hexdigest()


def _reject(reason: str, message: str) -> Unauthorized:
    return Unauthorized(message, details={"code": _DETAIL_CODES[reason], "reason": reason})


def _field(device: Mapping[str, Any], name: str, kind: type) -> Any:
    value = device.get(name)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        ok = isinstance(value, str) and value != ""
    if not ok:
        expected = "a non-negative integer" if kind is int else "a non-empty string"
        raise InvalidRequest(f"device.{name} must be {expected}", details={"field": f"device.{name}"})
    return value


def verify_device_signature(
    device: Mapping[str, Any],
    *,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    token: str | None,
    nonce: str,
    now_ms: int,
    max_skew_ms: int = DEVICE_SIGNATURE_SKEW_MS,
    platform: str | None = None,
    device_family: str | None = None,
) -> None:
    """Check a connect `device` block the way the OpenClaw gateway does.

    `nonce` is the nonce this connection's `connect.challenge` carried; `role`
    and `scopes` are the ones the connect params request (before any scope
    capping); `token` is `signature_token(params["auth"])`; `platform` and
    `device_family` are `client.platform` / `client.deviceFamily`.

    Raises `InvalidRequest` when the block is malformed, and `Unauthorized`
    (details `{code, reason}` with OpenClaw's detail codes) when the id does not
    match the key, the signature is stale, the nonce is missing or wrong, or
    neither the v3 nor the v2 payload verifies. Checks run in OpenClaw's order.
    """
    if not isinstance(device, Mapping):
        raise InvalidRequest("device must be an object", details={"field": "device"})
    # Lazily, only when a device proof is checked (see `public_key_raw`).
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    device_id = _field(device, "id", str)
    public_key = _field(device, "publicKey", str)
    signature = _field(device, "signature", str)
    signed_at = _field(device, "signedAt", int)
    provided_nonce = device.get("nonce")

    try:
        raw_key = public_key_raw(public_key)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        # OpenClaw derives no id from an unreadable key, so this surfaces as an id mismatch.
        # (A PEM key of an algorithm `cryptography` does not know raises UnsupportedAlgorithm,
        # which is no ValueError: it used to escape as INTERNAL with a traceback.)
        raise _reject(
            "device-id-mismatch", f"device identity mismatch: unreadable public key ({clip(str(exc))})"
        ) from exc
    if hashlib.sha256(raw_key).hexdigest() != device_id:
        raise _reject("device-id-mismatch", "device identity mismatch: id is not sha256(publicKey)")

    skew = abs(now_ms - signed_at)
    if skew > max_skew_ms:
        raise _reject(
            "device-signature-stale",
            f"device signature expired: signedAt is {skew} ms from the gateway clock (max {max_skew_ms})",
        )

    provided = provided_nonce.strip() if isinstance(provided_nonce, str) else ""
    if not provided:
        raise _reject("device-nonce-missing", "device nonce required")
    if provided != nonce:
        raise _reject("device-nonce-mismatch", "device nonce mismatch: not this connection's challenge nonce")

    try:
        sig = b64url_decode(signature)
    except (ValueError, binascii.Error) as exc:
        raise _reject("device-signature", "device signature invalid: not base64url") from exc

    common: dict[str, Any] = {
        "device_id": device_id,
        "client_id": client_id,
        "client_mode": client_mode,
        "role": role,
        "scopes": scopes,
        "signed_at_ms": signed_at,
        "token": token,
        "nonce": provided,
    }
    candidates = (
        build_device_payload_v3(**common, platform=platform, device_family=device_family),
        build_device_payload_v2(**common),
    )
    key = Ed25519PublicKey.from_public_bytes(raw_key)
    for payload in candidates:
        try:
            key.verify(sig, payload.encode("utf-8"))
        except InvalidSignature:
            continue
        return
    raise _reject("device-signature", "device signature invalid")
