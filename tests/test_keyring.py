"""The AES-256-GCM codec and its key ring (worker.keyring): round trips, the
binding of a ciphertext to its record and field, unreadable values, and
malformed rings as one ConfigError line that never shows a key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests import sealed
from worker import keyring
from worker.codec import (
    RECORD_MARK,
    PlainCodec,
    SecretContext,
    record_form,
    split_encrypted,
    text_form,
)
from worker.errors import ConfigError, SecretUnreadable
from worker.keyring import (
    AesGcmCodec,
    KeyRing,
    codec_from_settings,
    generate_key,
    key_ring_from_settings,
    parse_key_ring,
)
from worker.redisio import pack_evalsha
from worker.settings import Settings

K1, K2 = bytes(range(32)), bytes(range(1, 33))
B1, B2 = base64.b64encode(K1).decode(), base64.b64encode(K2).decode()
B16 = base64.b64encode(bytes(range(16))).decode()  # an AES-128 key
CTX = SecretContext("refreshd:", "credential", "c1", "refresh_token")


def codec(*keys: tuple[str, bytes]) -> AesGcmCodec:
    return AesGcmCodec(KeyRing(keys or [("k1", K1)]))


@pytest.mark.parametrize(
    "plaintext",
    [
        "rt-1",
        "x" * 63,  # below the deflate threshold
        "at0." + "0123456789" * 80,  # deflates well
        base64.urlsafe_b64encode(os.urandom(600)).decode(),  # random: deflate may not pay
        "ünïcødé ☃ token",
        '{"id_token": "eyJhbGciOi.x.y"}',
    ],
)
def test_round_trip_names_its_key_and_hides_the_value(plaintext: str) -> None:
    c = codec()
    stored = c.encode(plaintext, CTX)
    assert stored.startswith("e1.k1.")
    assert plaintext not in stored
    assert c.key_id(stored) == "k1"
    assert c.decode(stored, CTX) == plaintext
    assert c.encode("".join(list(plaintext)), CTX) != stored  # a fresh nonce every time


def test_empty_stays_empty() -> None:
    assert codec().encode("", CTX) == ""
    assert codec().decode("", CTX) == ""
    assert codec().key_id("") is None


def test_deflated_tokens_cost_little_more_than_plain_text() -> None:
    """base64 adds a third; deflating base64-like tokens first wins most of
    it back (raw: 800 characters would take 1,112)."""
    token = base64.urlsafe_b64encode(os.urandom(600)).decode()  # 800 characters
    assert len(codec().encode(token, CTX)) <= len(token) * 1.12
    repetitive = "at0." + f"{7:010d}" * 80  # 3 symbols: about 2 bits each
    assert len(codec().encode(repetitive, CTX)) < 250


@pytest.mark.parametrize(
    "other",
    [
        SecretContext("refreshd:", "credential", "c2", "refresh_token"),  # another record
        SecretContext("refreshd:", "credential", "c1", "access_token"),  # another field
        SecretContext("other:", "credential", "c1", "refresh_token"),  # another install
        SecretContext("refreshd:", "spool", "c1", "refresh_token"),  # another kind
        SecretContext("refreshd:", "credential", "c1refresh", "_token"),  # same letters
    ],
)
def test_a_moved_ciphertext_does_not_decrypt(other: SecretContext) -> None:
    c = codec()
    stored = c.encode("rt-1", CTX)
    with pytest.raises(SecretUnreadable) as err:
        c.decode(stored, other)
    assert err.value.reason == "undecryptable"
    assert other.record in str(err.value)
    assert "rt-1" not in str(err.value)


def test_a_tampered_ciphertext_does_not_decrypt() -> None:
    c = codec()
    stored = c.encode("rt-1" * 30, CTX)
    # (not the last character: its low bits may be padding that decodes away)
    for pos in (len("e1.k1.") + 2, len(stored) // 2, len(stored) - 5):
        flipped = "A" if stored[pos] != "A" else "B"
        with pytest.raises(SecretUnreadable, match="undecryptable"):
            c.decode(stored[:pos] + flipped + stored[pos + 1 :], CTX)
    for broken in ("e1.k1.", "e1.k1.AAAA", stored[:40], "e1.k1.!!!!" + stored[10:]):
        with pytest.raises(SecretUnreadable, match="undecryptable"):
            c.decode(broken, CTX)


def test_relabelling_with_another_key_id_does_not_decrypt() -> None:
    """The key id is part of the associated data: a ring where k2 is the
    same key as k1 still refuses k1's value presented as k2's."""
    c = codec(("k1", K1), ("k2", K1))
    stored = c.encode("rt-1", CTX)
    with pytest.raises(SecretUnreadable, match="undecryptable"):
        c.decode("e1.k2." + stored[len("e1.k1.") :], CTX)


def test_a_key_id_not_in_the_ring_is_unknown_key() -> None:
    stored = codec(("old", K1)).encode("rt-1", CTX)
    with pytest.raises(SecretUnreadable) as err:
        codec(("new", K2)).decode(stored, CTX)
    assert err.value.reason == "unknown_key"
    assert "'old'" in str(err.value)
    assert "new" in str(err.value)


def test_the_same_key_id_with_another_key_is_undecryptable() -> None:
    stored = codec(("k1", K1)).encode("rt-1", CTX)
    with pytest.raises(SecretUnreadable, match="undecryptable"):
        codec(("k1", K2)).decode(stored, CTX)


def test_primary_encrypts_every_key_decrypts() -> None:
    old = codec(("k1", K1))
    ring = codec(("k2", K2), ("k1", K1))
    legacy = old.encode("rt-old", CTX)
    assert ring.decode(legacy, CTX) == "rt-old"
    assert ring.key_id(ring.encode("rt-new", CTX)) == "k2"
    assert ring.primary_key_id == "k2"
    assert ring.encrypting


def test_plain_values_read_as_they_are_with_a_ring() -> None:
    """A database written before encryption was on keeps working."""
    assert codec().decode("rt-plain", CTX) == "rt-plain"
    assert codec().key_id("rt-plain") is None
    assert codec().decode("eyJhbGciOiJIUzI1NiJ9.e30.sig", CTX) == "eyJhbGciOiJIUzI1NiJ9.e30.sig"


def test_plain_codec_refuses_ciphertext_instead_of_passing_it_on() -> None:
    stored = codec().encode("rt-1", CTX)
    plain = PlainCodec()
    assert plain.encode("rt-1", CTX) == "rt-1"
    assert plain.decode("rt-1", CTX) == "rt-1"
    assert plain.key_id(stored) == "k1"
    assert plain.key_id("rt-1") is None
    assert not plain.encrypting
    assert plain.primary_key_id is None
    with pytest.raises(SecretUnreadable) as err:
        plain.decode(stored, CTX)
    assert err.value.reason == "unknown_key"


# ------------------------------------------------------------ the record form


def test_the_record_form_is_the_same_ciphertext_a_quarter_smaller() -> None:
    """A record holds the raw bytes after 0xFF (as ``surrogateescape``
    text); either form decrypts, names its key, and converts back exactly."""
    c = codec()
    token = base64.urlsafe_b64encode(os.urandom(600)).decode()
    text = c.encode(token, CTX)
    record = record_form(text)
    assert record.startswith(RECORD_MARK + "k1.")
    raw = record.encode("utf-8", "surrogateescape")
    assert raw.startswith(b"\xffk1.")
    assert len(raw) <= 0.76 * len(text)
    assert len(raw) < len(token)  # smaller than the plaintext itself
    assert c.decode(record, CTX) == token
    assert c.key_id(record) == "k1"
    assert text_form(record) == text
    assert record_form(record) == record
    assert text_form(text) == text
    assert raw.decode("utf-8", "surrogateescape") == record
    # what a script writes: the same bytes; sealed right after the text form
    # (a refresh's event, then its record), the same ciphertext
    assert c.encode_record(token, CTX) == raw
    # the same token for another field is sealed afresh, bound to that field
    other = SecretContext("refreshd:", "credential", "c1", "access_token")
    again = c.encode_record(token, other)
    assert isinstance(again, bytes)
    assert c.decode(again.decode("utf-8", "surrogateescape"), other) == token
    fresh = c.encode_record("rt-" + token, CTX)
    assert isinstance(fresh, bytes)
    assert c.decode(fresh.decode("utf-8", "surrogateescape"), CTX) == "rt-" + token
    assert PlainCodec().encode_record("rt-1", CTX) == "rt-1"
    assert c.encode_record("", CTX) == ""


def test_plain_values_keep_their_form() -> None:
    for plain in (
        "",
        "rt-1",
        "e1.",
        "e1.k1",
        "eyJhbGciOi.e30.sig",
        "\udcff-no-dot-here" + "x" * 20,
    ):
        assert record_form(plain) == plain
        assert text_form(plain) == plain
        assert split_encrypted(plain) is None
        assert codec().decode(plain, CTX) == plain


def test_a_record_form_value_is_bound_and_checked_as_the_text_form_is() -> None:
    c = codec(("k1", K1), ("k2", K1))
    record = record_form(c.encode("rt-1" * 30, CTX))
    mid = len(record) // 2
    flipped = record[:mid] + ("A" if record[mid] != "A" else "B") + record[mid + 1 :]
    with pytest.raises(SecretUnreadable, match="undecryptable"):
        c.decode(flipped, CTX)
    with pytest.raises(SecretUnreadable, match="undecryptable"):
        c.decode(record, SecretContext("refreshd:", "credential", "c2", "refresh_token"))
    with pytest.raises(SecretUnreadable, match="undecryptable"):  # relabelled
        c.decode(RECORD_MARK + "k2." + record[len(RECORD_MARK + "k1.") :], CTX)
    with pytest.raises(SecretUnreadable, match="undecryptable"):  # cut short
        c.decode(record[:20], CTX)
    with pytest.raises(SecretUnreadable) as err:
        codec(("new", K2)).decode(record, CTX)
    assert err.value.reason == "unknown_key"
    with pytest.raises(SecretUnreadable) as err:
        PlainCodec().decode(record, CTX)
    assert err.value.reason == "unknown_key"
    assert PlainCodec().key_id(record) == "k1"


def test_hiredis_packing_sends_the_record_forms_bytes() -> None:
    """hiredis refuses lone surrogates; the packer sends the bytes they
    stand for, as redis-py's encoder does with ENCODING_ERRORS."""
    record = record_form(codec().encode("rt-1" * 30, CTX))
    packed = pack_evalsha("0" * 40, ["k"], [record, "é", 7])
    assert record.encode("utf-8", "surrogateescape") in packed
    assert "é".encode() in packed
    sha = "0" * 40
    assert pack_evalsha(sha, ["k"], ["a"]) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha.encode() + b"\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\na\r\n"
    )


# ------------------------------------------------------------ payload kinds


def payload_kind(stored: str, ctx: SecretContext = CTX, key: bytes = K1) -> int:
    return sealed.payload_kind(stored, ctx, key)


def compact_codec() -> AesGcmCodec:
    c = codec()
    c.allow_compact_forms(True)
    return c


RANDOM_900 = base64.urlsafe_b64encode(os.urandom(675)).decode()  # 900 characters


@pytest.mark.parametrize(
    "token",
    [
        RANDOM_900,
        *(base64.urlsafe_b64encode(os.urandom(200 + n)).decode().rstrip("=") for n in range(3)),
        "at." + "_" * 129,  # every length modulo 4, a last character with low bits set
        "-" * 130,
        "at.000000000042." + "Zz9-" * 40,  # the benchmark endpoint's shape
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0." + "s" * 342,  # a JWT
        "." + "a" * 200 + "..b.",  # empty segments at either end and between
        "ya29.a0Af" + "Q" * 150,
    ],
)
def test_base64url_tokens_pack_six_bits_a_character(token: str) -> None:
    """Kind 2: each segment between dots 6 bits a character, plus two bytes
    of length; exactly the same text comes back, whatever its length or
    last character (the last group is filled with zero bits)."""
    c = compact_codec()
    for stored in (c.encode(token, CTX), record_form(c.encode(token, CTX))):
        assert payload_kind(stored) == 2
        assert c.decode(stored, CTX) == token
        assert codec().decode(stored, CTX) == token  # any reader of this release
    segments = token.count(".") + 1
    raw = c.encode_record(token, CTX)
    assert isinstance(raw, bytes)
    overhead = len(b"\xffk1.") + 12 + 16 + 1
    assert len(raw) - overhead <= 0.75 * len(token) + 2 * segments + 2 * segments


@pytest.mark.parametrize(
    "value",
    [
        "at0 " + "0123456789" * 80,  # a space: not base64url
        '{"id_token": "' + "x" * 200 + '"}',  # kept extras are JSON
        "tök" + "e" * 200,
        "a" * 70_000,  # a segment longer than two bytes count
        # other characters four at a time (a decoder that skipped them
        # would decode the rest, three bytes short per four)
        "a+b/" * 50,  # standard base64, not base64url
        "x" * 200 + "    ",
        "====" + "a" * 200,
    ],
)
def test_other_long_values_are_deflated(value: str) -> None:
    c = compact_codec()
    stored = c.encode(value, CTX)
    assert payload_kind(stored) == 1
    assert c.decode(stored, CTX) == value


def test_kind_2_waits_for_the_layout_and_short_values_stay_raw() -> None:
    """The previous release reads kinds 0 and 1 only: kind 2 is written
    once the store says no older process reads the database."""
    c = codec()
    assert payload_kind(c.encode(RANDOM_900, CTX)) == 1
    c.allow_compact_forms(True)
    assert payload_kind(c.encode(RANDOM_900, CTX)) == 2
    assert payload_kind(c.encode("rt-" + "x" * 100, CTX)) == 0
    c.allow_compact_forms(False)
    assert payload_kind(c.encode(RANDOM_900, CTX)) == 1


def test_a_malformed_kind_2_payload_is_undecryptable() -> None:
    """Sealed by this key for this place, yet not a kind 2 payload (a bug,
    never an attacker: they cannot seal): unreadable, never garbage."""
    c = compact_codec()
    aad = b"e1.k1." + CTX.aad()
    for payload in (b"\x02\x00", b"\x02\x00\x08AAA", b"\x07abc"):
        nonce = os.urandom(12)
        raw = nonce + AESGCM(K1).encrypt(nonce, payload, aad)
        stored = "e1.k1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")
        with pytest.raises(SecretUnreadable, match="undecryptable"):
            c.decode(stored, CTX)


# ------------------------------------------------------------ the ring


def test_inline_ring_primary_first_commas_or_spaces() -> None:
    ring = parse_key_ring(f"k2:{B2}, k1:{B1}", source="X", one_per_line=False)
    assert ring.ids == ("k2", "k1")
    assert ring.primary == "k2"
    assert parse_key_ring(f"k2:{B2}\nk1:{B1}", source="X", one_per_line=False).ids == ("k2", "k1")
    urlsafe = base64.urlsafe_b64encode(bytes([251] * 32)).decode().rstrip("=")
    assert parse_key_ring(f"u:{urlsafe}", source="X", one_per_line=False).ids == ("u",)


def test_file_ring_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-12\nk2:{B2}\n\n  k1:{B1}  \n")
    ring = key_ring_from_settings(Settings(encryption_keys_file=str(path)))
    assert ring is not None
    assert ring.ids == ("k2", "k1")
    assert "K" not in repr(ring).replace("KeyRing", "")  # ids only


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"k1:{B16}", "key 'k1' (entry 1) is 16 bytes; AES-256 needs 32"),
        (f"k1:{B1},k2:{B1[:-2]}!!", "key 'k2' (entry 2) is not valid base64"),
        (f"k1:{B1},k1:{B2}", "key id 'k1' appears twice (entry 2)"),
        (B1, "entry 1 is not kid:base64key"),
        (f"bad id:{B1}", "entry 1 is not kid:base64key"),
        (f"{'k' * 17}:{B1}", "entry 1 is not kid:base64key"),
        (" , ", "no key in it"),
    ],
)
def test_a_malformed_ring_is_one_line_without_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings(encryption_keys=text)
    assert str(err.value).startswith("REFRESHD_ENCRYPTION_KEYS: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    for secret in (B1, B16, B1[:-2], B2):
        assert secret not in str(err.value)


def test_a_malformed_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\nk1:{B1}\nk2:{B2[:-8]}\n")
    with pytest.raises(ConfigError, match=r"^REFRESHD_ENCRYPTION_KEYS_FILE: key 'k2' \(line 2\)"):
        Settings(encryption_keys_file=str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        Settings(encryption_keys_file=str(tmp_path / "missing"))
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is not text"):
        Settings(encryption_keys_file=str(path))


def test_both_sources_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k1:{B1}\n")
    with pytest.raises(ConfigError, match="not both"):
        Settings(encryption_keys=f"k1:{B1}", encryption_keys_file=str(path))


def test_settings_never_show_the_key() -> None:
    settings = Settings.from_env({"REFRESHD_ENCRYPTION_KEYS": f"k1:{B1}"})
    assert B1 not in repr(settings)
    assert settings.encrypted
    assert settings.event_secrets_mode == "encrypted"
    assert isinstance(codec_from_settings(settings), AesGcmCodec)
    assert isinstance(codec_from_settings(Settings()), PlainCodec)
    assert B1 not in repr(codec_from_settings(settings))


def test_event_secrets_setting() -> None:
    assert Settings().event_secrets_mode == "clear"
    keyed = {"REFRESHD_ENCRYPTION_KEYS": f"k1:{B1}"}
    for mode in ("encrypted", "omitted", "clear"):
        chosen = Settings.from_env(keyed | {"REFRESHD_EVENT_SECRETS": mode})
        assert chosen.event_secrets_mode == mode
    assert Settings(event_secrets="omitted").event_secrets_mode == "omitted"
    with pytest.raises(ConfigError, match="needs a key ring"):
        Settings(event_secrets="encrypted")
    with pytest.raises(ConfigError, match="REFRESHD_EVENT_SECRETS must be one of"):
        Settings(event_secrets="hidden")


def test_generated_keys_work_in_a_ring() -> None:
    key = generate_key()
    assert len(base64.b64decode(key)) == 32
    assert key != generate_key()
    ring = parse_key_ring(f"g1:{key}", source="X", one_per_line=False)
    c = AesGcmCodec(ring)
    assert c.decode(c.encode("s", CTX), CTX) == "s"


def test_associated_data_counts_utf8_bytes() -> None:
    """The format is documented for other languages: lengths are bytes."""
    ctx = SecretContext("refreshd:", "credential", "ü-1", "access_token")
    assert ctx.aad() == b"9:refreshd:10:credential4:\xc3\xbc-112:access_token"


def test_a_value_sealed_twice_in_one_place_is_one_ciphertext(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh seals its access token for its event, then its refresh
    token and access token for the record, under the credential's context:
    the record gets the event's ciphertext (one deflate, one encryption).
    Another context, or an equal but different string, is sealed afresh."""
    c = codec()
    access = "at." + base64.urlsafe_b64encode(os.urandom(600)).decode()
    calls: list[str] = []
    real = keyring._payload

    def counting(plaintext: str, compact: bool) -> bytes:
        calls.append(plaintext)
        return real(plaintext, compact)

    monkeypatch.setattr(keyring, "_payload", counting)
    here = SecretContext("refreshd:", "credential", "c1", "access_token")
    event = c.encode(access, here)
    c.encode("rt-short", CTX)
    record = c.encode(access, here)
    assert record == event
    assert calls == [access, "rt-short"]
    assert c.encode(access, SecretContext("refreshd:", "credential", "c2", "access_token")) != event
    assert c.encode("".join(list(access)), here) != event  # not the same object
    assert len(calls) == 4
    assert c.decode(record, here) == access


# ------------------------------------------------------------ another language

FORMAT_DIR = Path(__file__).resolve().parent / "interop" / "format"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_reads_every_payload_kind_as_the_readme_describes() -> None:
    """tests/interop/format/decrypt.mjs follows README "The format" with
    node's crypto and zlib only: it reads what this codec seals, kinds 0,
    1 and 2, bound to each context."""
    c = compact_codec()
    contexts = [
        SecretContext("refreshd:", "credential", "c-ü", "access_token"),
        SecretContext("app:", "event", "c2", "extra.id_token"),
    ]
    plaintexts = [
        "rt-1",  # kind 0
        "at0 " + "0123456789" * 30,  # kind 1
        RANDOM_900,  # kind 2
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0." + "s_-9" * 50 + ".",  # kind 2, dots
        "." + "a" * 201,  # kind 2, an empty first segment, 201 = 1 mod 4
    ]
    values = []
    for n, plaintext in enumerate(plaintexts):
        ctx = contexts[n % 2]
        stored = c.encode(plaintext, ctx)
        values.append({"stored": stored, **ctx._asdict()})
    assert sorted({payload_kind(v["stored"], contexts[n % 2]) for n, v in enumerate(values)}) == [
        0,
        1,
        2,
    ]
    out = subprocess.run(
        ["node", str(FORMAT_DIR / "decrypt.mjs")],
        input=json.dumps({"key": B1, "values": values}),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == plaintexts


@pytest.mark.parametrize(
    "ctx",
    [
        CTX,
        SecretContext("app:", "event", "c-2", "extra.id_token"),
        SecretContext("refreshd:", "credential", "ü-1", "access_token"),
        SecretContext("präfix:", "profile", "p", "client_secret"),
        SecretContext("refreshd:", "spool", "c1", "feld-ß"),
    ],
)
def test_the_codecs_associated_data_is_the_documented_one(ctx: SecretContext) -> None:
    """The codec builds the associated data with a cached start per key,
    prefix and record kind: byte for byte ``e1.<kid>.`` and ``ctx.aad()``,
    the first time and every time after."""
    c = codec(("k1", K1), ("k2", K2))
    for kid in ("k1", "k2", "k1"):
        assert c._aad(kid, ctx) == f"e1.{kid}.".encode() + ctx.aad()


def test_the_associated_data_stays_right_as_keys_prefixes_and_kinds_alternate() -> None:
    """The last start used is kept aside for the next call (a worker's
    calls share one): calls that alternate between keys, prefixes and
    kinds must each get their own."""
    c = codec(("k1", K1), ("k2", K2))
    contexts = [
        SecretContext("refreshd:", "credential", "c1", "access_token"),
        SecretContext("refreshd:", "event", "c1", "access_token"),
        SecretContext("other:", "credential", "c1", "access_token"),
        SecretContext("präfix:", "credential", "c1", "access_token"),
        SecretContext("refreshd:", "credential", "ü-1", "refresh_token"),
    ]
    for _ in range(2):
        for ctx in contexts:
            for kid in ("k1", "k2"):
                assert c._aad(kid, ctx) == f"e1.{kid}.".encode() + ctx.aad()


def test_the_codec_cost_bench_times_each_kind_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench.codec_cost``: its kind 1 run seals kind 1 and its
    kind 2 run kind 2, every call of a refresh reads back, and it prints
    both figures (their size is the bench's to report, not a test's)."""
    from bench.codec_cost import main, per_refresh

    for compact, kind in ((False, 1), (True, 2)):
        run, store = per_refresh(compact)
        run()
        ctx = store.secret_context("cred-0000012345", "access_token")
        access = "at." + base64.urlsafe_b64encode(os.urandom(600)).decode()
        assert sealed.payload_kind(store.codec.encode(access, ctx), ctx, bytes(32)) == kind
    assert main(["--rounds", "1", "--calls", "20"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"kind_1_us_per_refresh", "kind_2_us_per_refresh"}
    assert all(v > 0 for v in out.values())
