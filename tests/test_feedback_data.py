"""serve -> feedback -> training data: `serve.log_content` keeps what a chat asked and was told
(streamed too), and `rayft data from-feedback` turns ratings into KTO rows and preferences into
DPO rows, accounting for every rating and preference it read.

The rule and the accounting are checked on hand-written logs; then a real Ray Serve app (tiny
llama, an A/B experiment of the base and an adapter, an adapter as the shadow) answers the
official `openai` client, takes feedback over HTTP, and `rayft data from-feedback` runs as a
subprocess on what it logged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests
from test_serve_api import free_port
from test_serve_units import make_adapter

from rayft.config import JobConfig
from rayft.data import formats
from rayft.data.clean import normalize
from rayft.data.feedback import REASONS, from_feedback, rating_rule, select
from rayft.errors import RayftError
from rayft.serving.ab import assign

RAYFT = str(Path(sys.executable).parent / "rayft")
KEY = "sk-feedback"
ADMIN = "sk-feedback-admin"


# ------------------------------------------------------------------ the rule and the accounting


def test_rating_rule_reads_the_scale_and_takes_overrides():
    thumbs = rating_rule([0, 1, 1, 0.7])
    assert [thumbs.label(r) for r in (1, 0.5, 0.49, 0)] == [True, True, False, False]
    five = rating_rule([1, 5, 3])
    assert [five.label(r) for r in (5, 4, 3.5, 3, 2.5, 2, 1)] == [
        *(True, True),
        *(None, None, None),
        *(False, False),
    ]
    strict = rating_rule([1, 5], min_good=5)  # the bad half stays the scale's
    assert [strict.label(r) for r in (5, 4, 3, 2)] == [True, None, None, False]
    lenient = rating_rule([0, 1], max_bad=0)  # thumbs, with a neutral band
    assert [lenient.label(r) for r in (1, 0.5, 0.3, 0)] == [True, True, None, False]
    assert rating_rule([]).label(1) is True  # no ratings: thumbs
    with pytest.raises(RayftError, match="bad up to 4 is not below good from 4"):
        rating_rule([1, 5], min_good=4, max_bad=4)


P = [{"role": "user", "content": "where is my order? mail me at jane@example.com"}]
Q = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "refund?"}]


def _logs():
    """A hand-made serve directory: (requests, transcripts)."""
    answers = {  # id: (experiment, arm, messages, output)
        "a": ("exp", "base", P, "It ships today."),
        "b": ("exp", "cand", P, "No idea."),
        "c": ("exp", "base", Q, "Yes, within 30 days."),
        "d": ("exp", "cand", Q, "Yes, within 30 days."),
        "e": ("other", "base", P, "Tomorrow."),
        "f": ("exp", "base", P, "  "),
        "g": ("exp", "cand", P, "Soon."),
    }
    requests = [
        {"id": rid, "experiment": x, "arm": arm, "model": x, "shadow": False, "status": 200}
        for rid, (x, arm, _, _) in answers.items()
    ]
    requests += [{"id": "a-shadow", "experiment": "exp", "arm": "cand", "shadow": True}]
    requests += [{"id": "n", "experiment": "exp", "arm": "base", "model": "exp"}]  # no content
    transcripts = [
        {"id": rid, "experiment": x, "arm": arm, "model": x, "messages": m, "output": out}
        for rid, (x, arm, m, out) in answers.items()
    ]
    tool = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}
    requests += [{"id": "t", "experiment": "exp", "arm": "base", "model": "exp"}]
    transcripts += [{"id": "t", "messages": P, "output": None, "output_message": tool}]
    return requests, transcripts


def _feedback(*rows) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


FEEDBACK = _feedback(
    {"response_id": "a", "rating": 5},  # good
    {"response_id": "b", "rating": 1, "preferred_over": "a"},  # bad, and b > a ...
    {"response_id": "a", "preferred_over": "b"},  # ... and a > b: both preferences conflict
    {"response_id": "a", "rating": 4},  # good again: duplicate
    {"response_id": "c", "rating": 3},  # neutral
    {"response_id": "c", "preferred_over": "d"},  # equal texts
    {"response_id": "c", "preferred_over": "a"},  # Q against P
    {"response_id": "e", "rating": 5},  # --experiment exp: another experiment
    {"response_id": "f", "rating": 5},  # whitespace only
    {"response_id": "g", "rating": 5},  # good ...
    {"response_id": "g", "rating": 2},  # ... and bad: both dropped
    {"response_id": "n", "rating": 5},  # logged, no transcript
    {"response_id": "t", "rating": 5},  # a tool call
    {"response_id": "zzz", "rating": 5},  # not in the log
    {"response_id": "a-shadow", "rating": 5},  # a shadow answered no one
    {"response_id": "a", "preferred_over": "a"},  # self
    {"response_id": "a"},  # nothing said
    '{"response_id": "a", "rat',  # cut short
    "",  # blank: not a row
    {"response_id": "g", "preferred_over": "a", "rating": "great"},  # the rating is no number
)


def test_every_rating_and_preference_is_used_or_dropped_for_one_reason():
    requests, transcripts = _logs()
    sel = select(requests, transcripts, FEEDBACK, experiment="exp")
    assert sel.rule.good_from == 4 and sel.rule.bad_to == 2  # a 5 was given: the 1-5 scale
    assert [(s.response_id, label) for s, label in sel.ratings] == [("a", True), ("b", False)]
    assert [(s.response_id, s.rejected_id) for s in sel.preferences] == [("g", "a")]
    assert set(sel.dropped) == set(REASONS)
    assert {k: v for k, v in sel.dropped.items() if v} == {
        "malformed": 4,  # self-preference, nothing said, cut short, the rating "great"
        "no_matching_request": 2,  # zzz, the shadow
        "other_experiment": 1,
        "no_transcript": 1,
        "tool_calls": 1,
        "empty_answer": 1,
        "neutral_rating": 1,
        "different_prompts": 1,
        "same_answer": 1,
        "conflicting_labels": 4,  # g's two ratings, b > a and a > b
        "duplicate": 1,
    }
    assert sel.rows_in == 19 and sel.signals == 21  # rows 2 and 20 hold two each
    assert sel.signals == len(sel.ratings) + len(sel.preferences) + sum(sel.dropped.values())

    # Excluding an arm drops what it answered, on either side of a preference.
    sel = select(requests, transcripts, FEEDBACK, exclude_arms=("cand",))
    assert sel.dropped["excluded_arm"] == 7  # b's rating, b > a, a > b, c > d, g's 2, g > a
    assert sel.dropped["other_experiment"] == 0 and len(sel.ratings) == 2  # a, and e
    assert sel.signals == len(sel.ratings) + len(sel.preferences) + sum(sel.dropped.values())


def test_from_feedback_writes_scrubbed_rows_sources_and_report(tmp_path):
    requests, transcripts = _logs()
    serve = tmp_path / "serve"
    serve.mkdir()
    for name, rows in (("requests", requests), ("transcripts", transcripts)):
        (serve / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (serve / "feedback.jsonl").write_text("\n".join(FEEDBACK) + "\n")
    report = from_feedback(serve, tmp_path / "out", experiment="exp")
    out = tmp_path / "out"
    scrubbed = [{"role": "user", "content": "where is my order? mail me at <EMAIL>"}]
    kto = [json.loads(line) for line in (out / "kto.jsonl").read_text().splitlines()]
    assert kto == [
        {"prompt": scrubbed, "completion": "It ships today.", "label": True},
        {"prompt": scrubbed, "completion": "No idea.", "label": False},
    ]
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    assert dpo == [{"prompt": scrubbed, "chosen": "Soon.", "rejected": "It ships today."}]
    for row, kind in ((kto[0], "unpaired"), (dpo[0], "preference")):  # as `rayft prepare` reads
        assert formats.to_example(row, formats.detect(row)).kind == kind
    sources = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]
    assert sources[1] == {
        **dict(file="kto.jsonl", line=2, response_id="b", model="exp", experiment="exp"),
        **dict(arm="cand", rating=1.0, feedback_line=2),
    }
    assert sources[2]["file"] == "dpo.jsonl" and sources[2]["line"] == 1
    assert (sources[2]["chosen_arm"], sources[2]["rejected_arm"]) == ("cand", "base")
    assert report == json.loads((out / "feedback_report.json").read_text())
    assert report["pii_redactions"]["email"] == 3  # one per row written
    assert report["used"] == {"kto": 2, "dpo": 1} and report["labels"] == {"good": 1, "bad": 1}
    assert report["signals"] == sum(report["used"].values()) + sum(report["dropped"].values())


def test_developer_turns_and_text_parts_become_role_and_content(tmp_path):
    from rayft.data.feedback import _prompt

    counts: Counter = Counter()
    given = [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text"}]},
        {"role": "user", "content": "call +49 30 1234567\r\n"},
    ]
    assert _prompt(given, counts) == [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "call <PHONE>"},
    ]
    assert counts["phone"] == 1


def test_cli_names_a_missing_log(tmp_path):
    r = subprocess.run(
        [RAYFT, "data", "from-feedback", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "requests.jsonl does not exist" in r.stderr


# ------------------------------------------------------------------ the real server


TOOL = {
    "type": "function",
    "function": {
        "name": "track",
        "parameters": {
            "type": "object",
            "properties": {"order": {"enum": ["17", "18"]}},  # a random model's string runs on
            "required": ["order"],
            "additionalProperties": False,
        },
    },
}
P1 = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "My email is jane.doe@example.com, where is my order?"},
]
P2 = [{"role": "user", "content": "hi there"}]
P3 = [{"role": "user", "content": "what is two plus two"}]
ARMS = {"base": 1, "a1": 1}


def user_on(arm: str) -> str:
    return next(u for u in (f"u{i}" for i in range(100)) if assign("exp", ARMS, u) == arm)


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    run = tmp_path_factory.mktemp("feedback_run")
    cfg = JobConfig(
        run_dir=str(run),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "api_key": KEY,
            "adapters": {
                "a1": str(make_adapter(tiny_model, run / "a1", seed=1)),
                "a2": str(make_adapter(tiny_model, run / "a2", seed=2)),
            },
            "experiments": {"exp": {"arms": ARMS, "shadow": "a2"}},
            "log_content": True,
            "admin_key": ADMIN,
            "max_tokens_limit": 64,
            "max_n": 2,
            "cpus_per_replica": 0.5,
        },
    )
    url = start(cfg)
    yield cfg, url
    stop()


@pytest.mark.slow
def test_serve_feedback_to_kto_and_dpo_rows(server, tmp_path):
    from openai import OpenAI

    cfg, url = server
    c = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    ub, ua = user_on("base"), user_on("a1")

    def chat(messages, user=None, model="exp", **kw):
        kw = {"max_tokens": 8, "temperature": 0, **({"user": user} if user else {}), **kw}
        r = c.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)
        return r.headers["x-rayft-arm"], r.parse()

    answers = {}  # name: (id, arm, messages, the text the client got)
    for name, messages, user in (("r1", P1, ub), ("r2", P1, ua), ("r4", P3, ub)):
        arm, r = chat(messages, user)
        answers[name] = (r.id, arm, messages, r.choices[0].message.content)
    for name, messages, user in (("r5", P3, ua), ("r6", P2, ua), ("r11", P2, ua)):
        arm, r = chat(messages, user)
        answers[name] = (r.id, arm, messages, r.choices[0].message.content)
    raw = c.chat.completions.with_raw_response.create(
        model="exp", messages=P2, user=ub, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(raw.parse())
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    answers["r3"] = (chunks[0].id, raw.headers["x-rayft-arm"], P2, streamed)
    arm, r = chat(P1, model="a2")  # the arm --exclude-arm names
    answers["r7"] = (r.id, arm, P1, r.choices[0].message.content)
    arm, r = chat(P2, ub)
    answers["r9"] = (r.id, arm, P2, r.choices[0].message.content)
    arm, r = chat(P2, ub, n=2, temperature=1.0, seed=5)  # two answers: the first is kept
    assert r.choices[0].message.content != r.choices[1].message.content
    answers["r12"] = (r.id, arm, P2, r.choices[0].message.content)
    arm, r8 = chat(
        [{"role": "user", "content": "track order 17"}],
        model="a1",
        max_tokens=60,
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "track"}},
        parallel_tool_calls=False,
    )
    assert r8.choices[0].message.tool_calls
    legacy = c.completions.create(model="base", prompt="hello", max_tokens=4, temperature=0)
    ids = {name: a[0] for name, a in answers.items()}
    assert [answers[n][1] for n in ("r1", "r2", "r3", "r5", "r7", "r9")] == [
        *("base", "a1", "base", "a1", "a2", "base")
    ]
    assert answers["r1"][3] != answers["r2"][3] and answers["r3"][3] != answers["r6"][3]
    assert answers["r9"][3] == answers["r3"][3]  # greedy: the same text, streamed or not

    # What was kept: every answered chat but the shadow's copies and the legacy completion.
    serve_dir = cfg.run_path / "serve"
    kept = (serve_dir / "transcripts.jsonl").read_text().splitlines()
    said = {t["id"]: t for t in map(json.loads, kept)}
    assert set(said) == {*ids.values(), r8.id}
    for rid, arm, messages, text in answers.values():
        t = said[rid]
        assert (t["messages"], t["output"], t["arm"]) == (messages, text, arm), t
        assert "output_message" not in t and t["time"] > 0
    assert said[ids["r1"]]["experiment"] == "exp" and said[ids["r7"]]["experiment"] is None
    kept_call = said[r8.id]["output_message"]["tool_calls"][0]
    assert kept_call == r8.choices[0].message.tool_calls[0].model_dump()

    def feedback(body: dict) -> requests.Response:
        return requests.post(
            url.removesuffix("/v1") + "/v1/feedback",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )

    assert feedback({"response_id": "chatcmpl-nobody", "rating": 5}).status_code == 404
    for body in (
        {"response_id": ids["r1"], "rating": 5},  # kto good
        {"response_id": ids["r2"], "rating": 1},  # kto bad
        {"response_id": ids["r1"], "preferred_over": ids["r2"]},  # dpo
        {"response_id": ids["r3"], "rating": 4, "preferred_over": ids["r6"]},  # kto good + dpo
        {"response_id": ids["r4"], "rating": 3},  # neutral
        {"response_id": ids["r5"], "rating": 5},  # conflicting ...
        {"response_id": ids["r5"], "rating": 1},  # ... labels
        {"response_id": ids["r6"], "rating": 4},  # kto good
        {"response_id": ids["r6"], "rating": 5},  # duplicate
        {"response_id": ids["r7"], "rating": 5},  # excluded arm
        {"response_id": r8.id, "rating": 5},  # tool calls
        {"response_id": ids["r9"], "rating": 2},  # kto bad
        {"response_id": legacy.id, "rating": 5},  # no transcript
        {"response_id": ids["r11"], "rating": 5},  # its request line goes below
        {"response_id": ids["r4"], "preferred_over": ids["r3"]},  # different prompts
        {"response_id": ids["r9"], "preferred_over": ids["r3"]},  # the same answer
        {"response_id": ids["r1"], "preferred_over": ids["r2"]},  # duplicate preference
    ):
        assert feedback(body).status_code == 200, body

    # A rotated request log: r11 is rated, but its request is no longer there.
    copy = tmp_path / "serve"
    shutil.copytree(serve_dir, copy)
    lines = (copy / "requests.jsonl").read_text().splitlines(keepends=True)
    (copy / "requests.jsonl").write_text("".join(x for x in lines if ids["r11"] not in x))
    out = tmp_path / "out"
    run = subprocess.run(
        [RAYFT, "data", "from-feedback", str(copy), "--out", str(out), "--exclude-arm", "a2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "17 feedback rows, 18 ratings and preferences" in run.stdout
    assert "kto.jsonl  5 rows (3 good, 2 bad); rating rule: good >= 4, bad <= 2" in run.stdout

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    def prompt(messages: list[dict]) -> list[dict]:
        return [
            {**m, "content": m["content"].replace("jane.doe@example.com", "<EMAIL>")}
            for m in messages
        ]

    kto = read("kto.jsonl")
    want = [("r1", True), ("r2", False), ("r3", True), ("r6", True), ("r9", False)]
    assert kto == [
        {
            "prompt": prompt(answers[n][2]),
            "completion": normalize(answers[n][3]),
            "label": label,
        }
        for n, label in want
    ]
    assert read("dpo.jsonl") == [
        {
            "prompt": prompt(answers[a][2]),
            "chosen": normalize(answers[a][3]),
            "rejected": normalize(answers[b][3]),
        }
        for a, b in (("r1", "r2"), ("r3", "r6"))
    ]
    sources = read("sources.jsonl")
    assert [(s["file"], s["line"]) for s in sources] == [
        *(("kto.jsonl", i) for i in range(1, 6)),
        *(("dpo.jsonl", 1), ("dpo.jsonl", 2)),
    ]
    assert [s["response_id"] for s in sources[:5]] == [ids[n] for n, _ in want]
    assert [s["arm"] for s in sources[:5]] == ["base", "a1", "base", "a1", "base"]
    assert sources[0]["experiment"] == "exp" and sources[0]["rating"] == 5
    assert (sources[5]["chosen_id"], sources[5]["rejected_id"]) == (ids["r1"], ids["r2"])
    assert (sources[6]["chosen_arm"], sources[6]["rejected_arm"]) == ("base", "a1")

    report = json.loads((out / "feedback_report.json").read_text())
    assert (report["feedback_rows"], report["signals"]) == (17, 18)
    assert report["used"] == {"kto": 5, "dpo": 2}
    assert report["dropped"] == {
        **dict.fromkeys(REASONS, 0),
        "no_matching_request": 1,
        "excluded_arm": 1,
        "no_transcript": 1,
        "tool_calls": 1,
        "neutral_rating": 1,
        "different_prompts": 1,
        "same_answer": 1,
        "conflicting_labels": 2,
        "duplicate": 2,
    }
    assert report["pii_redactions"]["email"] == 3  # P1's rows: r1, r2 and the r1/r2 pair
    assert report["excluded_arms"] == ["a2"]

    # The loop closed: the KTO rows train an adapter (prepare -> train, objective auto -> kto),
    # which the running server loads and serves as a new arm of a new experiment.
    from rayft.data import prepare
    from rayft.training import train

    job = JobConfig.model_validate(
        {
            "name": "from-feedback",
            "run_dir": str(cfg.run_path / "kto_run"),  # under serve.adapter_root
            "model": {"base": cfg.model.base},
            "data": {
                "train_files": [str(out / "kto.jsonl")],
                "split": {"validation": 0, "test": 0},
            },
            "training": {"max_steps": 4, "per_device_batch_size": 2, "learning_rate": 1e-2},
            "cluster": {"num_workers": 1},
        }
    )
    prepare(job)
    data_report = json.loads((job.run_path / "data" / "data_report.json").read_text())
    assert data_report["kind"] == "unpaired" and data_report["rows_out"]["train"] == 5
    art = train(job)
    assert art.summary["objective"] == "kto" and art.summary["steps"] == 4

    def admin(method: str, path: str, body: dict) -> dict:
        r = requests.request(
            method, url.removesuffix("/v1") + path, json=body, timeout=120,
            headers={"Authorization": f"Bearer {ADMIN}"},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()

    admin("POST", "/admin/adapters", {"name": "kto1", "path": str(art.output_dir)})
    admin("POST", "/admin/experiments", {"name": "loop", "arms": {"base": 1, "kto1": 1}})
    user = next(
        u
        for u in (f"v{i}" for i in range(100))
        if assign("loop", {"base": 1, "kto1": 1}, u) == "kto1"
    )
    arm, r = chat(P2, user, model="loop")
    assert arm == "kto1" and r.choices[0].message.content is not None
