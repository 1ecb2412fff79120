#!/usr/bin/env python3
"""Writes fixtures/golden_seal.json: sealed-entry vectors computed independently of the Rust
code (Python's hmac for HKDF-SHA-256, HChaCha20 here, ChaCha20-Poly1305 from `cryptography`),
so the golden test checks common/src/seal.rs and entry.rs against a second implementation.
Run once when the format changes (a new ENTRY_VERSION); never in CI."""

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

SALT = b"gateway seal salt"
INFO = b"gateway seal v2"
AD_LABEL = b"gateway entry v2\n"


def hkdf(secret: bytes, key_id: str, tenant: str) -> bytes:
    prk = hmac.new(SALT, secret, hashlib.sha256).digest()
    info = INFO + b"\0" + key_id.encode() + b"\0" + tenant.encode()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def rotl(v, c):
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def quarter(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    s = list(struct.unpack("<4I", b"expand 32-byte k")) + list(struct.unpack("<8I", key)) + list(
        struct.unpack("<4I", nonce16)
    )
    for _ in range(10):
        quarter(s, 0, 4, 8, 12); quarter(s, 1, 5, 9, 13); quarter(s, 2, 6, 10, 14); quarter(s, 3, 7, 11, 15)
        quarter(s, 0, 5, 10, 15); quarter(s, 1, 6, 11, 12); quarter(s, 2, 7, 8, 13); quarter(s, 3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def xchacha_seal(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    sub = hchacha20(key, nonce[:16])
    return nonce + ChaCha20Poly1305(sub).encrypt(b"\0\0\0\0" + nonce[16:], plaintext, ad)


def line(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def case(secret, key_id, name, tenant, key, created, ttl, generation, inner, body, nonce):
    clear = {"v": 2, "tenant": tenant, "key": key, "created": created, "ttl": ttl}
    if generation:
        clear["generation"] = generation
    clear["kid"] = key_id
    metadata = line(clear)
    tenant_key = hkdf(secret, key_id, tenant)
    plaintext = line(inner).encode() + b"\n" + body.encode()
    value = xchacha_seal(tenant_key, nonce, AD_LABEL + metadata.encode(), plaintext)
    return {
        "name": name,
        "tenant": tenant,
        "key": key,
        "tenant_key_hex": tenant_key.hex(),
        "created": created,
        "ttl": ttl,
        "generation": generation,
        **inner,
        "usage": inner.get("usage"),
        "body": body,
        "nonce_hex": nonce.hex(),
        "metadata": metadata,
        "value_hex": value.hex(),
    }


def main():
    secret = bytes(range(32))
    key_id = "k1"
    chat = '{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"The golden answer."},"finish_reason":"stop"}]}'
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    json_inner = {"status": 200, "content_type": "application/json", "model": "gpt-4o-mini", "provider": "openai"}
    cases = [
        case(secret, key_id, "chat_with_usage", "acme",
             "f10431fffabcae465a223a8d1a45bd47a03814f428a25fc683b826569a75f772",
             1700000000, 3600, 0, {**json_inner, "usage": usage}, chat, bytes(range(100, 124))),
        case(secret, key_id, "purged_once_no_usage", "globex",
             "0f" * 32, 1700000123, 60, 4, json_inner, chat, bytes(24)),
        case(secret, key_id, "empty_body_with_newlines", "acme",
             "ab" * 32, 1, 1, 0,
             {"status": 200, "content_type": "text/plain", "model": "m", "provider": "p"},
             "\n\nline\n", bytes([0xFF] * 24)),
    ]
    out = {
        "secret_hex": secret.hex(),
        "key_id": key_id,
        "hkdf_salt": SALT.decode(),
        "hkdf_info": INFO.decode(),
        "cases": cases,
    }
    path = Path(__file__).resolve().parent.parent / "fixtures" / "golden_seal.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
