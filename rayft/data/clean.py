"""Cleaning: Unicode/whitespace normalisation and PII scrubbing with typed placeholders.

PII patterns are deliberately narrow and every number-shaped match is checked (Luhn for
cards, mod-97 for IBANs, separators for phones) so order numbers, dates and versions survive:
a scrubber that eats the facts of a support ticket ruins the training data more than a rare
missed phone number does.
"""

from __future__ import annotations

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

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newline
_BLANK_LINES = re.compile(r"\n{3,}")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Phones need a leading + or separators between groups: a bare run of digits is an id, not a phone.
_PHONE = re.compile(
    r"(?<![\w+-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"
    r"|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")


def normalize(text: str) -> str:
    """NFC, no zero-width characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


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


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", m.group())
    return PLACEHOLDERS["credit_card"] if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _iban(m: re.Match) -> str | None:
    return PLACEHOLDERS["iban"] if iban_ok(m.group()) else None


def _phone(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group())
    return PLACEHOLDERS["phone"] if 7 <= len(digits) <= 15 else None


# Order matters: emails and IBANs contain digit runs the card and phone patterns would split.
_SCRUBBERS = (
    ("email", _EMAIL, lambda m: PLACEHOLDERS["email"]),
    ("iban", _IBAN, _iban),
    ("credit_card", _CARD, _card),
    ("phone", _PHONE, _phone),
    ("ip_address", _IP, lambda m: PLACEHOLDERS["ip_address"]),
)


def scrub(text: str, types: list[str] | tuple[str, ...], counts: Counter) -> str:
    """Replace the PII `types` in `text` by placeholders; add what was replaced to `counts`."""
    for name, pattern, replace in _SCRUBBERS:
        if name not in types:
            continue

        def sub(m: re.Match, name=name, replace=replace) -> str:
            out = replace(m)
            if out is None:
                return m.group()
            counts[name] += 1
            return out

        text = pattern.sub(sub, text)
    return text
