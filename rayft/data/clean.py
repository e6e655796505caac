"""Cleaning: Unicode/whitespace normalisation and PII scrubbing with typed placeholders.

PII patterns are deliberately narrow and every number-shaped match is checked (Luhn, a card
network's prefix and the grouping for cards, the country's length and mod-97 for IBANs,
separators for phones, the address parser for IPv6) so order numbers, dates and versions
survive: a scrubber that eats the facts of a support ticket ruins the training data more than
a rare missed phone number does. Separators, though, are taken as people and exports write
them: PII is matched on a folded view of the text (full-width digits and letters as ASCII,
tabs and no-break spaces as spaces), groups may be apart by runs of spaces, dots or dashes,
and letters in any case. tests/test_pii_adversarial.py holds both sides to that.

`example` cleans every text of a validated row, whatever its kind.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from typing import Any

from rayft.data.fields import RowError
from rayft.data.formats import Example

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

# The patterns read the folded view (`_fold`): full-width forms are ASCII there, and tabs and
# the no-break, narrow, thin and ideographic spaces are plain spaces, so one pattern holds for
# text that was retyped, exported or pasted from a PDF. A group separator is a run of up to
# four spaces or one dot or dash, spaced or not ("+90  532  338  84  33", "4111.1111...").
_SEP = r"(?:[ ]{1,4}|[ ]?[.-][ ]?)"
# Spaces around "@" and the domain's dots (JOHN.DOE @ EXAMPLE . COM) on both sides or neither;
# `_email` asks more of a spaced address's top-level domain.
_DOT = r"(?:\.|[ ]{1,2}\.[ ]{1,2})"
_EMAIL = re.compile(
    rf"\b[A-Za-z0-9._%+-]+(?:@|[ ]{{1,2}}@[ ]{{1,2}})[A-Za-z0-9-]+(?:{_DOT}[A-Za-z0-9-]+)*"
    rf"{_DOT}[A-Za-z]{{2,}}\b"
)
_COMMON_TLDS = {"com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "io", "app"}
# Any case; the country's IBAN length and mod-97 decide (`_iban`), so the pattern takes the
# longest run of letters and digits that separators allow.
_IBAN = re.compile(rf"(?<!\w)[A-Za-z]{{2}}\d{{2}}(?:{_SEP}?[A-Za-z0-9]){{11,30}}")
# 13-19 digits, optionally grouped; the issuer prefix, Luhn and the grouping decide (`_card`).
_CARD = re.compile(rf"(?<![\w.-])\d(?:{_SEP}?\d){{12,22}}(?!\w)")
# Phones need a leading + or separators between groups: a bare run of digits is an id, not a
# phone. International numbers: +, then 7-15 digits in groups, an (area code) or (0) among them
# (+49 (0)30 1234567). National ones: the North American 3-3-4 shape (an optional leading 1), one
# kind of separator throughout, not inside a longer run of digit groups (order 123 4567 890,
# 100 200 3000 4000), so dates (2024 01 15), versions and amounts, which have other shapes, stay.
_PHONE = re.compile(
    rf"(?<![\w+-])(?:\+[ ]?\d(?:{_SEP}?(?:\(\d{{1,4}}\)|\d)){{5,20}}"
    rf"|(?:1{_SEP})?(?:\(\d{{3}}\)[ ]{{0,4}}|\d{{3}}{_SEP})\d{{3}}{_SEP}\d{{4}})(?!\w)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted run (10.2.3.4567, 1.2.3.4.5); a sentence's full stop may follow.
_IP = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\w)")
# A run of hex digits, colons and dots with at least two colons and one decimal digit, not
# inside a word (C++/Rust paths like std::io never start one) or a longer run; the possessive
# match takes the whole run and `ipaddress` decides. Times (12:30:45) and MAC addresses
# (six groups, no "::") are not IPv6 addresses and stay.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[\da-fA-F.]*:[\da-fA-F.]*:)(?=[\da-fA-F:.]*\d)[\da-fA-F:.]++(?!\w)"
)
# IBAN length by country (SWIFT's IBAN registry).
_IBAN_LENGTHS = {
    country: int(length)
    for country, length in re.findall(
        r"([A-Z]{2})(\d\d)",
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 "
        "DJ27 DK18 DO28 EE20 EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 "
        "HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 "
        "MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 QA29 RO24 "
        "RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 "
        "VG24 XK20 YE30",
    )
}
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
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def card_prefix_ok(digits: str) -> bool:
    """Whether `digits` starts with the issuer prefix of a card network."""
    return any(lo <= digits[: len(lo)] <= hi for lo, hi in _CARD_PREFIXES)


# Folded for matching only, one character for one, so a match's place in the view is its place
# in the text: full-width forms and decimal digits of every script to ASCII, spaces to " ",
# dashes to "-".
_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_FOLD.update(dict.fromkeys(map(ord, "\t\u00a0\u1680\u202f\u205f\u3000"), " "))
_FOLD.update(dict.fromkeys(range(0x2000, 0x200B), " "))
_FOLD.update(dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2212\ufe63"), "-"))
_FOLD.update(
    {cp: str(unicodedata.decimal(chr(cp))) for cp in range(0x80, 0x10000) if chr(cp).isdecimal()}
)
_FOLDABLE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_FOLD)) + "]")
_DIGIT = re.compile(r"\d")
_NOT_DIGIT = re.compile(r"\D")
_GAP = re.compile(r"[ .-]+")
_GAP_BEFORE = re.compile(rf"\d({_SEP})\Z")
_GAP_AFTER = re.compile(rf"({_SEP})\d")


def _fold(text: str) -> str:
    if (text.isascii() and "\t" not in text) or not _FOLDABLE.search(text):
        return text
    return text.translate(_FOLD)


# Each check takes a match in the view and returns where the PII in it ends, or None.


def _email(m: re.Match) -> int | None:
    run = m.group()
    # Spaced out, an address needs a country's or a common top-level domain: "@ team.lead"
    # is a mention, not an address.
    tld = run.rpartition(".")[2].strip().lower()
    if " " in run and len(tld) != 2 and tld not in _COMMON_TLDS:
        return None
    return m.end()


def _iban(m: re.Match) -> int | None:
    run, length = m.group(), _IBAN_LENGTHS.get(m.group()[:2].upper())
    places = [i for i, c in enumerate(run) if c.isalnum()]
    if length is None or len(places) < length:
        return None
    end = places[length - 1] + 1  # the country's length, not the run's
    if end < len(run) and run[end].isalnum():  # it goes on: a word, not an IBAN
        return None
    return m.start() + end if iban_ok("".join(run[i] for i in places[:length])) else None


def _group_ends(run: str) -> list[int]:
    """Where `run` ends and where each of its groups but the last does, longest first."""
    return [len(run), *reversed([g.start() for g in _GAP.finditer(run)])]


def _card(m: re.Match) -> int | None:
    run = m.group()
    gaps = [g.strip() for g in _GAP.findall(run)]
    groups = _GAP.split(run)
    # Grouped as cards are printed (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3) with one kind of
    # separator: a list of prices (4.99 5.49 ...), amounts (1.234.567...) or sizes is not a
    # card. A longer run may be a card and what follows it (a year, a code): its first groups
    # are tried too.
    if gaps and (
        len(set(gaps)) > 1 or len(groups[0]) != 4 or any(len(g) < 4 for g in groups[1:-1])
    ):
        return None
    for end in _group_ends(run):
        digits = _NOT_DIGIT.sub("", run[:end])
        if 13 <= len(digits) <= 19 and card_prefix_ok(digits) and luhn_ok(digits):
            return m.start() + end
    return None


def _phone(m: re.Match) -> int | None:
    run = m.group()
    if run.startswith("+"):  # E.164: at most 15 digits; what follows them is not the number
        for end in _group_ends(run):
            count = len(_NOT_DIGIT.sub("", run[:end]))
            if count <= 15:
                return m.start() + end if count >= 7 else None
        return None
    gaps = {g.strip() for g in _GAP.findall(run.partition(")")[2].lstrip() or run)}
    if len(gaps) > 1:  # 415-555 0132: not one number
        return None
    # inside a longer run of groups with the same separator: an id or a list of numbers
    before = _GAP_BEFORE.search(m.string, max(0, m.start() - 6), m.start())
    after = _GAP_AFTER.match(m.string, m.end())
    if any(x is not None and {x.group(1).strip()} == gaps for x in (before, after)):
        return None
    return m.end()


def _ip(m: re.Match) -> int | None:
    return m.end()


def _ipv6(m: re.Match) -> int | None:
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
        return m.start() + len(candidate)
    return None


# Order matters: emails and IBANs contain digit runs the card and phone patterns would split.
# The last field is a character every match contains ("" for a digit): most texts have no
# "@" or ":", and a plain `in` is cheaper than a regex scan that finds nothing.
_SCRUBBERS = (
    ("email", _EMAIL, _email, "@"),
    ("iban", _IBAN, _iban, ""),
    ("credit_card", _CARD, _card, ""),
    ("phone", _PHONE, _phone, ""),
    ("ip_address", _IPV6, _ipv6, ":"),  # first: an IPv4-mapped IPv6 address ends in an IPv4 one
    ("ip_address", _IP, _ip, "."),
)


def scrub(text: str, types: list[str] | tuple[str, ...], counts: Counter) -> str:
    """Replace the PII `types` in `text` by placeholders; add what was replaced to `counts`."""
    view = _fold(text)
    digits = _DIGIT.search(view) is not None
    for name, pattern, check, mark in _SCRUBBERS:
        if name not in types or (mark and mark not in view) or (name != "email" and not digits):
            continue
        pieces, done, at = [], 0, 0
        while (m := pattern.search(view, at)) is not None:
            end = check(m)
            if end is None:  # as re.sub would: on after the rejected match
                at = max(m.end(), m.start() + 1)
                continue
            pieces += (text[done : m.start()], PLACEHOLDERS[name])
            counts[name] += 1
            done = at = end
        if pieces:
            text = "".join(pieces) + text[done:]
            view = _fold(text)
    return text


# --------------------------------------------------------------------------- examples


def example(ex: Example, normalize_text: bool, pii_types: list[str], counts: Counter) -> Example:
    """`ex` with every text it holds normalised (`normalize_text`) and scrubbed of `pii_types`:
    turns, answers, tool-call arguments and every string inside a prompt row's `item`; the
    placeholders written are added to `counts`. Raises RowError(empty_content) for a text that
    cleaning left empty, as validation would have."""

    def fix(text: str) -> str:
        text = normalize(text) if normalize_text else text
        return scrub(text, pii_types, counts) if pii_types else text

    # Validated again after cleaning: whitespace-only content is empty content.
    if ex.messages is not None:
        ex.messages = [_message(m, fix, pii_types, counts) for m in ex.messages]
        for i, m in enumerate(ex.messages):
            if not m["content"] and "tool_calls" not in m:
                raise RowError("empty_content", f"messages[{i}].content", "content is empty")
    if ex.text is not None:
        ex.text = fix(ex.text)
        if not ex.text:
            raise RowError("empty_content", "text", "'text' is empty")
    if ex.prompt is not None:
        ex.prompt = [_message(m, fix, pii_types, counts) for m in ex.prompt]
    if ex.kind in ("prompt", "unpaired"):
        for i, m in enumerate(ex.prompt or []):
            if not m["content"]:
                field = f"{ex.prompt_field}[{i}].content"
                raise RowError("empty_content", field, f"'{field}' is empty")
    # The grader's reference is scrubbed as the prompt is: an address in both stays the same.
    ex.item = _value(ex.item, fix)
    answers = {"preference": ("chosen", "rejected"), "unpaired": ("completion",)}
    for name in answers.get(ex.kind, ()):
        setattr(ex, name, fix(getattr(ex, name) or ""))
        if not getattr(ex, name):
            raise RowError("empty_content", name, f"'{name}' is empty")
    return ex


def _message(m: dict[str, Any], fix, pii_types: list[str], counts: Counter) -> dict[str, Any]:
    m = {**m, "content": fix(m["content"])}
    if "tool_calls" in m:  # arguments are text the model learns to write: scrubbed too
        m["tool_calls"] = [_scrub_call(c, pii_types, counts) for c in m["tool_calls"]]
    return m


def _scrub_call(call: dict[str, Any], pii_types: list[str], counts: Counter) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    if pii_types:
        arguments = scrub(arguments, pii_types, counts)
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _value(value: Any, fix) -> Any:
    """Every string inside a JSON value cleaned; the keys of objects are names, kept."""
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [_value(v, fix) for v in value]
    if isinstance(value, dict):
        return {k: _value(v, fix) for k, v in value.items()}
    return value
