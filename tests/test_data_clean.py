"""Normalisation and PII scrubbing: each PII type is replaced and counted; look-alikes survive."""

from __future__ import annotations

from collections import Counter

import pytest

from rayft.data.clean import PLACEHOLDERS, iban_ok, luhn_ok, normalize, scrub

ALL = list(PLACEHOLDERS)


def _scrub(text: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    return scrub(text, ALL, counts), counts


def test_normalize_unicode_and_whitespace():
    # "e" + combining acute -> NFC "é"; zero-width space removed; runs of spaces and tabs collapse.
    text = "  Cafe\u0301\u200b  is\t\topen \r\n\r\n\r\n\r\nline  two  "
    assert normalize(text) == "Café is open\n\nline two"


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Mail me at jane.doe+shop@example.co.uk today", "Mail me at <EMAIL> today", "email"),
        ("Call +1 415 555 0132 now", "Call <PHONE> now", "phone"),
        ("Call (415) 555-0132 now", "Call <PHONE> now", "phone"),
        ("Call 415-555-0132 now", "Call <PHONE> now", "phone"),
        ("UK: +44 20 7946 0958.", "UK: <PHONE>.", "phone"),
        ("Card 4111 1111 1111 1111 expires", "Card <CREDIT_CARD> expires", "credit_card"),
        ("Card 5500-0000-0000-0004.", "Card <CREDIT_CARD>.", "credit_card"),
        ("card 4012888888881881", "card <CREDIT_CARD>", "credit_card"),
        ("from 192.168.1.20 at night", "from <IP_ADDRESS> at night", "ip_address"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please", "iban"),
        ("IBAN GB82WEST12345698765432.", "IBAN <IBAN>.", "iban"),
    ],
)
def test_pii_replaced_and_counted(text, expected, kind):
    out, counts = _scrub(text)
    assert out == expected
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        "Order A123456 and order #98765432 are late",  # order numbers
        "Order 4111111111111112 failed",  # 16 digits failing Luhn: an id, not a card
        "Tracking 1Z999AA10123456784 shows nothing",
        "Invoice 2024-01-15 for $1,299.00",  # dates and amounts
        "App version 4.5.12 and build 10.2.3.4567",  # versions are not IPs
        "Ticket 5551234567 was closed",  # a bare digit run is not a phone
        "Ref GB82WEST12345698765431 (bad checksum)",  # IBAN look-alike failing mod-97
        "user@localhost is not an email address",
        "Room 300-401 on floor 2",
    ],
)
def test_look_alikes_survive(text):
    out, counts = _scrub(text)
    assert out == text and not counts


def test_several_types_in_one_text_and_type_selection():
    text = "a@b.io, 4111 1111 1111 1111, 10.0.0.1, +1 415 555 0132"
    out, counts = _scrub(text)
    assert out == "<EMAIL>, <CREDIT_CARD>, <IP_ADDRESS>, <PHONE>"
    assert counts == Counter(email=1, credit_card=1, ip_address=1, phone=1)
    only_email: Counter = Counter()
    assert scrub(text, ["email"], only_email).startswith("<EMAIL>, 4111")
    assert only_email == Counter(email=1)


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")
