"""Cleaning: Unicode/whitespace normalisation and PII scrubbing with typed placeholders.

PII patterns are deliberately narrow and every number-shaped match is checked (Luhn for
cards with a card network's prefix, mod-97 for IBANs, separators for phones, the address
parser for IPv6) so order numbers, dates and versions survive:
a scrubber that eats the facts of a support ticket ruins the training data more than a rare
missed phone number does.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "iban": "<IBAN>",
    "credit_card": "<CREDIT_CARD>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
}

# Zero-width space, word joiner and BOM carry nothing; ZWJ and ZWNJ are kept: they join emoji
# sequences and are part of the spelling of Persian and Indic scripts. Control characters go
# too, but for tab and newline.
_INVISIBLE = re.compile(r"[\u200b\u2060\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING = re.compile(r"[^\S\n]+$", re.MULTILINE)  # whitespace but newline, at a line's end
_BLANK_LINES = re.compile(r"\n{4,}")  # three or more blank lines

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# 13-19 digits, optionally grouped by single spaces or dashes; the issuer prefix and Luhn decide.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Phones need a leading + or separators between groups: a bare run of digits is an id, not a phone.
# International numbers: + country code, optional (area), then groups; the last may be a long
# subscriber number (+49 30 1234567). National ones: the North American 3-3-4 shape, with
# dots, dashes or single spaces (the same separator throughout), not inside a longer run of
# digit groups (order 123 4567 890, 100 200 3000 4000), so dates (2024 01 15), versions and
# amounts, which have other shapes, stay.
_PHONE = re.compile(
    r"(?<![\w+-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){0,3}[ .-]\d{2,8}"
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"
    r"|(?<!\d[ .-])\d{3}([ .-])\d{3}\1\d{4}(?![ .-]\d))(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")
# A run of hex digits, colons and dots with at least two colons and one decimal digit, not
# inside a word (C++/Rust paths like std::io never start one) or a longer run; the possessive
# match takes the whole run and `ipaddress` decides. Times (12:30:45) and MAC addresses
# (six groups, no "::") are not IPv6 addresses and stay.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[\da-fA-F.]*:[\da-fA-F.]*:)(?=[\da-fA-F:.]*\d)[\da-fA-F:.]++(?!\w)"
)
# Issuer identification number ranges of the card networks (ISO/IEC 7812): Visa; Mastercard;
# Amex; Discover; JCB; Diners Club; UnionPay. A Luhn-valid reference number (one in ten is)
# that starts like no card is not a card.
_CARD_PREFIXES = (
    ("4", "4"),
    ("51", "55"),
    ("2221", "2720"),
    ("34", "34"),
    ("37", "37"),
    ("6011", "6011"),
    ("644", "649"),
    ("65", "65"),
    ("3528", "3589"),
    ("300", "305"),
    ("36", "36"),
    ("38", "38"),
    ("62", "62"),
)


def normalize(text: str) -> str:
    """NFC, \\n line endings, no invisible or control characters, no trailing spaces, at most
    two blank lines in a row, stripped. Indentation and spacing inside lines stay: in code,
    tables and aligned text they are content. NFC rather than NFKC, which would also turn
    "x²" into "x2" and full-width text into ASCII, changing what the text says."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", _INVISIBLE.sub("", text))
    return _BLANK_LINES.sub("\n\n\n", text).strip()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def card_prefix_ok(digits: str) -> bool:
    """Whether `digits` starts with the issuer prefix of a card network."""
    return any(lo <= digits[: len(lo)] <= hi for lo, hi in _CARD_PREFIXES)


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", m.group())
    ok = 13 <= len(digits) <= 19 and card_prefix_ok(digits) and luhn_ok(digits)
    return PLACEHOLDERS["credit_card"] if ok else None


def _iban(m: re.Match) -> str | None:
    return PLACEHOLDERS["iban"] if iban_ok(m.group()) else None


def _ipv6(m: re.Match) -> str | None:
    run = m.group()
    address = run.rstrip(".")  # the end of a sentence
    for candidate in (address, address.rstrip(":")):  # "... at 2001:db8::1: it failed"
        groups = [g for g in candidate.split(":") if g]
        # Two groups or fewer is a slice in code far more often (a[1::2], a[::2]), and such
        # short addresses (::1, fe80::1) are well-known ones, not anybody's.
        if len(groups) < 3 and "." not in candidate:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return PLACEHOLDERS["ip_address"] + run[len(candidate) :]
    return None


def _phone(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group())
    return PLACEHOLDERS["phone"] if 7 <= len(digits) <= 15 else None


# Order matters: emails and IBANs contain digit runs the card and phone patterns would split.
# The last field is a character every match contains ("" for a digit): most texts have no
# "@" or ":", and a plain `in` is cheaper than a regex scan that finds nothing.
_SCRUBBERS = (
    ("email", _EMAIL, lambda m: PLACEHOLDERS["email"], "@"),
    ("iban", _IBAN, _iban, ""),
    ("credit_card", _CARD, _card, ""),
    ("phone", _PHONE, _phone, ""),
    ("ip_address", _IPV6, _ipv6, ":"),  # first: an IPv4-mapped IPv6 address ends in an IPv4 one
    ("ip_address", _IP, lambda m: PLACEHOLDERS["ip_address"], "."),
)
_DIGIT = re.compile(r"\d")


def scrub(text: str, types: list[str] | tuple[str, ...], counts: Counter) -> str:
    """Replace the PII `types` in `text` by placeholders; add what was replaced to `counts`."""
    digits = _DIGIT.search(text) is not None
    for name, pattern, replace, mark in _SCRUBBERS:
        if name not in types or (mark and mark not in text) or (name != "email" and not digits):
            continue

        def sub(m: re.Match, name=name, replace=replace) -> str:
            out = replace(m)
            if out is None:
                return m.group()
            counts[name] += 1
            return out

        text = pattern.sub(sub, text)
    return text
