"""Normalisation and PII scrubbing: each PII type is replaced and counted; look-alikes survive."""

from __future__ import annotations

from collections import Counter

import pytest

from rayft.data.clean import PLACEHOLDERS, card_prefix_ok, iban_ok, luhn_ok, normalize, scrub

ALL = list(PLACEHOLDERS)


def _scrub(text: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    return scrub(text, ALL, counts), counts


def test_normalize_unicode_and_whitespace():
    # "e" + combining acute -> NFC "é"; zero-width space and control characters removed;
    # CRLF -> LF; trailing spaces go, spacing inside a line stays; 3 blank lines become 2.
    text = "  Cafe\u0301\u200b  is\t\topen \r\n\r\n \r\n\t\r\nline\x00  two\x07  "
    assert normalize(text) == "Café  is\t\topen\n\n\nline  two"
    assert normalize("a\n\n\nb\rc") == "a\n\n\nb\nc"  # two blank lines are kept as they are
    # joiners are part of emoji sequences and of Persian spelling: kept
    assert normalize(
        "\U0001f469\u200d\U0001f4bb and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    ) == ("\U0001f469\u200d\U0001f4bb and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")


def test_normalize_keeps_code_indentation():
    code = "def f(x):\r\n    if x:  \r\n\treturn  [1,  2]\r\n\r\n\r\n\r\n\r\nclass A:\n    pass\n"
    assert normalize(code) == "def f(x):\n    if x:\n\treturn  [1,  2]\n\n\nclass A:\n    pass"
    table = "| a   | b |\n|-----|---|\n| 1   | 2 |"
    assert normalize(table) == table


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Mail me at jane.doe+shop@example.co.uk today", "Mail me at <EMAIL> today", "email"),
        ("Call +1 415 555 0132 now", "Call <PHONE> now", "phone"),
        ("Call (415) 555-0132 now", "Call <PHONE> now", "phone"),
        ("Call 415-555-0132 now", "Call <PHONE> now", "phone"),
        ("UK: +44 20 7946 0958.", "UK: <PHONE>.", "phone"),
        ("Call 555 123 4567 now", "Call <PHONE> now", "phone"),
        ("Call (555) 123-4567 now", "Call <PHONE> now", "phone"),
        ("Berlin: +49 30 1234567, evenings", "Berlin: <PHONE>, evenings", "phone"),
        ("or 415.555.0132", "or <PHONE>", "phone"),
        ("Card 4111 1111 1111 1111 expires", "Card <CREDIT_CARD> expires", "credit_card"),
        ("Card 5500-0000-0000-0004.", "Card <CREDIT_CARD>.", "credit_card"),
        ("card 4012888888881881", "card <CREDIT_CARD>", "credit_card"),
        ("from 192.168.1.20 at night", "from <IP_ADDRESS> at night", "ip_address"),
        ("from 2001:db8::1 at night", "from <IP_ADDRESS> at night", "ip_address"),
        ("host 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "host <IP_ADDRESS>.", "ip_address"),
        ("via [fe80::1ff:fe23:4567:890a]:8080", "via [<IP_ADDRESS>]:8080", "ip_address"),
        ("mapped ::ffff:192.0.2.128 here", "mapped <IP_ADDRESS> here", "ip_address"),
        ("Amex 3782 822463 10005 ok", "Amex <CREDIT_CARD> ok", "credit_card"),
        ("Mastercard 2223000048400011", "Mastercard <CREDIT_CARD>", "credit_card"),
        ("JCB 3530111333300000", "JCB <CREDIT_CARD>", "credit_card"),
        ("Diners 3056930009020004", "Diners <CREDIT_CARD>", "credit_card"),
        ("Discover 6011111111111117", "Discover <CREDIT_CARD>", "credit_card"),
        ("UnionPay 6200000000000005", "UnionPay <CREDIT_CARD>", "credit_card"),
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
        "order 123 4567 890 and 555 123 4567 890",  # digit groups of other shapes, or longer
        "ids 100 200 3000 4000; on 2024 01 15 and 2024-01-15",  # number lists and dates
        "paid 1 234 567 EUR on 2024-01-15 10:30:00 +0100",  # amounts, UTC offsets
        "mixed 415-555 0132 separators",
        "ref 1234-5678-9012-3452 is the case number",  # Luhn-valid, but no card network's prefix
        "Shipment 9999 9999 9999 9995 left",  # Luhn-valid, prefix 9: no network
        "Meet at 12:30 or at 12:30:45 sharp",  # times are not IPv6
        "MAC 00:1A:2B:3C:4D:5E and 01-23-45-67-89-AB",
        "Use std::vector, a[1::2], a[::2] and Foo::bar",  # code, not addresses
        "hash deadbeef:cafe and ts 2024-01-15T12:30:45Z",
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
    assert luhn_ok("1234567890123452") and not card_prefix_ok("1234567890123452")
    assert all(card_prefix_ok(p + "0" * 12) for p in ("4", "51", "2720", "34", "6445", "3589"))
    assert not any(
        card_prefix_ok(p + "0" * 12) for p in ("50", "56", "2220", "2721", "3527", "306")
    )
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")
