"""`rayft data from-feedback`: what `rayft serve` answered and what people said about it, as
training data. Reads a serve directory's request log, transcripts (`serve.log_content`) and
feedback, and writes KTO rows from ratings, DPO rows from pairwise preferences, and a report
that accounts for every rating and preference read: used, or dropped for a named reason.

The link from a row back to the response it came from goes to a sidecar, `sources.jsonl`
(`file`, `line`), not into the rows: the kto and preference formats read their own keys only
and `rayft prepare` would drop a `source` key without a word. `line` is 1-based, as the `source`
column (`file:line`) of the prepared data says it.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.data.clean import PLACEHOLDERS, normalize, scrub
from rayft.errors import RayftError
from rayft.messages import join_text_parts

# Why a rating or a preference made no row, in the order they are checked: a response answers
# to the first that applies, a preference to the first of either of its two responses'.
REASONS = (
    "malformed",  # not JSON, no response_id, no rating nor preferred_over, or a self-preference
    "no_matching_request",  # the id is not in requests.jsonl (a rotated log, another server's)
    "other_experiment",  # --experiment names another one
    "excluded_arm",  # --exclude-arm: e.g. the candidate being trained, not on its own outputs
    "no_transcript",  # answered without serve.log_content, or a legacy completion
    "tool_calls",  # tools in the answer or the conversation: these rows are role and content
    "empty_answer",
    "neutral_rating",
    "different_prompts",  # a preference between answers to different messages
    "same_answer",  # a preference between two equal texts teaches nothing
    "conflicting_labels",  # rated good and bad, or A over B and B over A: all of them dropped
    "duplicate",  # the same label (or preference) again: the first is kept
)
PII_TYPES = tuple(dict.fromkeys(PLACEHOLDERS))


@dataclass(frozen=True)
class RatingRule:
    """Which ratings make a good (KTO label true) and a bad answer; the rest are neutral."""

    good_from: float
    bad_to: float | None  # None: every rating below good_from is bad
    scale: str  # how the rule was chosen, for the report

    def label(self, rating: float) -> bool | None:
        if rating >= self.good_from:
            return True
        if rating < self.good_from if self.bad_to is None else rating <= self.bad_to:
            return False
        return None

    def describe(self) -> str:
        bad = f"< {self.good_from:g}" if self.bad_to is None else f"<= {self.bad_to:g}"
        return f"good >= {self.good_from:g}, bad {bad} ({self.scale})"


def rating_rule(
    ratings: list[float], min_good: float | None = None, max_bad: float | None = None
) -> RatingRule:
    """The scale is read off the ratings: all within [0, 1] are thumbs (0/1, or a score in
    between): good from 0.5, bad below it, none neutral. Any rating above 1 makes it a 1-5
    scale: good from 4, bad up to 2, 3 neutral. `min_good` and `max_bad` replace either half."""
    thumbs = all(0 <= r <= 1 for r in ratings)
    good, bad = (0.5, None) if thumbs else (4.0, 2.0)
    scale = "thumbs: every rating in [0, 1]" if thumbs else "1-5: a rating above 1"
    if min_good is not None or max_bad is not None:
        scale = f"given, else {scale}"
    good = good if min_good is None else min_good
    bad = bad if max_bad is None else max_bad
    if bad is not None and bad >= good:
        raise RayftError(
            f"rating rule: bad up to {bad:g} is not below good from {good:g}, so a rating would "
            "be both; set --max-bad-rating below --min-good-rating (defaults: 2 and 4 on a 1-5 "
            "scale; below 0.5 and 0.5 for thumbs)"
        )
    return RatingRule(good, bad, scale)


@dataclass(frozen=True)
class Signal:
    """One rating, or one preference, of a feedback row (a row may hold both)."""

    line: int  # 1-based line of feedback.jsonl
    response_id: str
    rating: float | None = None  # a rating of response_id
    rejected_id: str | None = None  # a preference: response_id was preferred to this one


@dataclass
class Selection:
    """What the feedback makes: the ratings and preferences used, and why the rest was not."""

    rows_in: int
    signals: int  # rows_in + rows holding both a rating and a preference
    ratings: list[tuple[Signal, bool]]  # one per response, in feedback order
    preferences: list[Signal]
    dropped: Counter
    rule: RatingRule


def _signals(line: str, number: int) -> tuple[list[Signal], int]:
    """The rating and the preference of one feedback line, and how many of them are malformed
    (a line that is not a feedback row counts as one)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return [], 1
    if not isinstance(row, dict) or not isinstance(row.get("response_id"), str):
        return [], 1
    rid, rating, other = row["response_id"], row.get("rating"), row.get("preferred_over")
    if rating is None and other is None:
        return [], 1
    out, bad = [], 0
    if rating is not None:
        numeric = isinstance(rating, int | float) and not isinstance(rating, bool)
        if numeric and math.isfinite(rating):
            out.append(Signal(number, rid, rating=float(rating)))
        else:
            bad += 1
    if other is not None:
        if isinstance(other, str) and other != rid:
            out.append(Signal(number, rid, rejected_id=other))
        else:
            bad += 1
    return out, bad


def _uses_tools(transcript: dict) -> bool:
    return "output_message" in transcript or any(
        m.get("role") == "tool" or m.get("tool_calls") for m in transcript["messages"]
    )


def select(
    requests: list[dict],
    transcripts: list[dict],
    feedback_lines: list[str],
    min_good: float | None = None,
    max_bad: float | None = None,
    exclude_arms: tuple[str, ...] = (),
    experiment: str | None = None,
) -> Selection:
    """Which ratings and preferences become rows. Every one read is either used or counted
    under one reason of `REASONS`: signals = used ratings + used preferences + dropped."""
    answered = {r["id"]: r for r in requests if not r.get("shadow")}
    said = {t["id"]: t for t in transcripts}

    def refusal(rid: str) -> str | None:
        request = answered.get(rid)
        if request is None:
            return "no_matching_request"
        if experiment is not None and request.get("experiment") != experiment:
            return "other_experiment"
        if request.get("arm") in exclude_arms:
            return "excluded_arm"
        if rid not in said:
            return "no_transcript"
        if _uses_tools(said[rid]):
            return "tool_calls"
        if not normalize(said[rid]["output"] or ""):
            return "empty_answer"
        return None

    dropped: Counter = Counter({reason: 0 for reason in REASONS})
    signals, rows_in = [], 0
    for number, line in enumerate(feedback_lines, 1):
        if not line.strip():
            continue
        rows_in += 1
        found, bad = _signals(line, number)
        dropped["malformed"] += bad
        signals += found
    in_scope = [
        s.rating
        for s in signals
        if s.rating is not None
        and refusal(s.response_id) not in ("no_matching_request", "other_experiment")
    ]
    rule = rating_rule(in_scope, min_good, max_bad)

    labelled: list[tuple[Signal, bool]] = []
    paired: list[Signal] = []
    for s in signals:
        if s.rating is not None:
            label = rule.label(s.rating)
            reason = refusal(s.response_id) or (None if label is not None else "neutral_rating")
            if reason is None:
                labelled.append((s, label))
            else:
                dropped[reason] += 1
            continue
        found = {refusal(s.response_id), refusal(s.rejected_id)} - {None}
        reason = min(found, key=REASONS.index) if found else None
        if reason is None:
            chosen, rejected = said[s.response_id], said[s.rejected_id]
            if _key(chosen["messages"]) != _key(rejected["messages"]):
                reason = "different_prompts"
            elif normalize(chosen["output"]) == normalize(rejected["output"]):
                reason = "same_answer"
        if reason is None:
            paired.append(s)
        else:
            dropped[reason] += 1

    labels = defaultdict(set)
    for s, label in labelled:
        labels[s.response_id].add(label)
    ratings, kept = [], set()
    for s, label in labelled:
        if len(labels[s.response_id]) > 1:
            dropped["conflicting_labels"] += 1
        elif s.response_id in kept:
            dropped["duplicate"] += 1
        else:
            kept.add(s.response_id)
            ratings.append((s, label))
    pairs = {(s.response_id, s.rejected_id) for s in paired}
    preferences, kept = [], set()
    for s in paired:
        pair = (s.response_id, s.rejected_id)
        if (s.rejected_id, s.response_id) in pairs:
            dropped["conflicting_labels"] += 1
        elif pair in kept:
            dropped["duplicate"] += 1
        else:
            kept.add(pair)
            preferences.append(s)
    signals_in = len(signals) + dropped["malformed"]
    return Selection(rows_in, signals_in, ratings, preferences, dropped, rule)


def _key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


# --------------------------------------------------------------------------- rows and files


def _text(text: str, counts: Counter) -> str:
    return scrub(normalize(text), PII_TYPES, counts)


def _prompt(messages: list[dict], counts: Counter) -> list[dict[str, str]]:
    """The request's messages as kto and preference rows hold them: role and content, text
    parts joined as the server joins them, `developer` as `system` (as the server renders it
    for templates without it), normalised and scrubbed."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = join_text_parts([p.get("text", "") for p in content if isinstance(p, dict)])
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(content, counts)})
    return out


def rows(
    sel: Selection, requests: list[dict], transcripts: list[dict]
) -> tuple[list[dict], list[dict], list[dict], Counter]:
    """(kto rows, dpo rows, their sources, PII redactions) of a selection."""
    answered = {r["id"]: r for r in requests if not r.get("shadow")}
    said = {t["id"]: t for t in transcripts}
    counts: Counter = Counter({kind: 0 for kind in PII_TYPES})
    kto: list[dict] = []
    dpo: list[dict] = []
    sources: list[dict[str, Any]] = []
    for s, label in sel.ratings:
        t, r = said[s.response_id], answered[s.response_id]
        prompt = _prompt(t["messages"], counts)
        kto.append({"prompt": prompt, "completion": _text(t["output"], counts), "label": label})
        sources.append(
            {
                "file": "kto.jsonl",
                "line": len(kto),
                "response_id": s.response_id,
                "model": r.get("model"),
                "experiment": r.get("experiment"),
                "arm": r.get("arm"),
                "rating": s.rating,
                "feedback_line": s.line,
            }
        )
    for s in sel.preferences:
        chosen, rejected = said[s.response_id], said[s.rejected_id]
        prompt = _prompt(chosen["messages"], counts)
        dpo.append(
            {
                "prompt": prompt,
                "chosen": _text(chosen["output"], counts),
                "rejected": _text(rejected["output"], counts),
            }
        )
        sources.append(
            {
                "file": "dpo.jsonl",
                "line": len(dpo),
                "chosen_id": s.response_id,
                "rejected_id": s.rejected_id,
                "model": answered[s.response_id].get("model"),
                "experiment": answered[s.response_id].get("experiment"),
                "chosen_arm": answered[s.response_id].get("arm"),
                "rejected_arm": answered[s.rejected_id].get("arm"),
                "feedback_line": s.line,
            }
        )
    return kto, dpo, sources, counts


def _records(path: Path) -> list[dict]:
    """A log's JSON objects; a line cut short by a crash is skipped (the rest still counts)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            out.append(row)
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def from_feedback(
    serve_dir: Path,
    out: Path,
    min_good: float | None = None,
    max_bad: float | None = None,
    exclude_arms: list[str] | tuple[str, ...] = (),
    experiment: str | None = None,
) -> dict:
    """Write `out/{kto,dpo,sources}.jsonl` and `out/feedback_report.json`; return the report."""
    serve_dir, out = Path(serve_dir), Path(out)
    for name in ("requests.jsonl", "feedback.jsonl"):
        if not (serve_dir / name).is_file():
            raise RayftError(
                f"{serve_dir / name} does not exist: give the serve directory of a `rayft serve` "
                "run (<run_dir>/serve) that has answered requests and taken feedback"
            )
    requests = _records(serve_dir / "requests.jsonl")
    transcripts = _records(serve_dir / "transcripts.jsonl")
    lines = (serve_dir / "feedback.jsonl").read_text().splitlines()
    sel = select(requests, transcripts, lines, min_good, max_bad, tuple(exclude_arms), experiment)
    kto, dpo, sources, pii = rows(sel, requests, transcripts)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "kto.jsonl", kto)
    _write(out / "dpo.jsonl", dpo)
    _write(out / "sources.jsonl", sources)
    report = {
        "serve_dir": str(serve_dir),
        "feedback_rows": sel.rows_in,
        "signals": sel.signals,
        "used": {"kto": len(kto), "dpo": len(dpo)},
        "dropped": dict(sel.dropped),
        "labels": {"good": sum(r["label"] for r in kto), "bad": sum(not r["label"] for r in kto)},
        "rating_rule": {
            "good_from": sel.rule.good_from,
            "bad_to": sel.rule.bad_to,
            "rule": sel.rule.describe(),
        },
        "experiment": experiment,
        "excluded_arms": sorted(exclude_arms),
        "transcripts": len(transcripts),
        "pii_redactions": dict(pii),
    }
    (out / "feedback_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict, out: Path) -> str:
    """The report as `rayft data from-feedback` prints it."""
    dropped = {k: v for k, v in report["dropped"].items() if v}
    pii = {k: v for k, v in report["pii_redactions"].items() if v}
    lines = [
        f"{report['serve_dir']}: {report['feedback_rows']} feedback rows, {report['signals']} "
        "ratings and preferences (a row may hold one of each)",
        f"  kto.jsonl  {report['used']['kto']} rows ({report['labels']['good']} good, "
        f"{report['labels']['bad']} bad); rating rule: {report['rating_rule']['rule']}",
        f"  dpo.jsonl  {report['used']['dpo']} rows (pairs)",
        f"  dropped    {sum(dropped.values())}"
        + "".join(f"\n    {k:20s} {v}" for k, v in dropped.items()),
        f"  PII redacted: {', '.join(f'{k} {v}' for k, v in pii.items()) or 'none'}",
    ]
    if not report["transcripts"]:
        lines.append(
            "  no transcripts: serve with serve.log_content: true to keep what was asked and "
            "answered"
        )
    lines.append(f"wrote {out}/kto.jsonl, dpo.jsonl, sources.jsonl, feedback_report.json")
    return "\n".join(lines)
