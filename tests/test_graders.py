"""rayft.graders: every grader type's scores against hand-computed values, the template rules,
build-time refusals naming the field, the python grader's subprocess (errors, timeout), and the
model graders against a real OpenAI-compatible HTTP server started here."""

from __future__ import annotations

import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayft.errors import RayftError
from rayft.graders import Grader, GraderError, Scores, build, grade

OUT = "{{sample.output_text}}"


def run(spec: dict, outputs: list[str], items: list[dict] | None = None, **kw) -> Scores:
    return grade(
        build(spec, **kw), [{"output_text": o} for o in outputs], items or [{}] * len(outputs)
    )


def check(operation: str) -> dict:
    return {
        "type": "string_check",
        "name": "c",
        "input": OUT,
        "reference": "{{item.ref}}",
        "operation": operation,
    }


# ---------------------------------------------------------------- string_check


@pytest.mark.parametrize(
    "operation, answer, reference, expected",
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("like", "Paris", "It is Paris", 0.0),  # the reference is looked for in the input
        ("ilike", "It is PARIS.", "paris", 1.0),
        ("ilike", "It is Lyon.", "paris", 0.0),
    ],
)
def test_string_check_truth_table(operation, answer, reference, expected):
    s = run(check(operation), [answer], [{"ref": reference}])
    assert s.scores == [expected]
    assert s.errors == [None] and s.error_count == 0
    assert s.parts == {"c": [expected]} and s.passed is None


def test_a_leaf_grader_names_itself():
    g = build(check("eq"))
    assert isinstance(g, Grader) and g.name == "c" and g.type == "string_check"
    assert g.names() == ["c"]


# ---------------------------------------------------------------- text_similarity


def similarity(metric: str, **extra) -> dict:
    return {
        "type": "text_similarity",
        "name": "sim",
        "input": OUT,
        "reference": "{{item.ref}}",
        "evaluation_metric": metric,
        **extra,
    }


@pytest.mark.parametrize(
    "metric, expected",
    [
        # answer: the cat sat on the mat / reference: the cat lay on a mat (6 tokens each)
        ("rouge_1", 4 / 6),  # shared unigrams: the, cat, on, mat -> P = R = F = 4/6
        ("rouge_2", 1 / 5),  # shared bigrams: "the cat" of 5 each
        ("rouge_l", 4 / 6),  # LCS: the cat on mat
        ("rouge_5", 0.0),  # no shared 5-gram
    ],
)
def test_rouge_by_hand(metric, expected):
    s = run(similarity(metric), ["the cat sat on the mat"], [{"ref": "the cat lay on a mat"}])
    assert s.scores == [pytest.approx(expected)]


def test_gleu_by_hand():
    # "a b c" vs "a b d": 6 n-grams (1- to 3-grams) each; shared: a, b, "a b" -> 3/6
    assert run(similarity("gleu"), ["a b c"], [{"ref": "a b d"}]).scores == [pytest.approx(0.5)]
    assert run(similarity("gleu"), ["x y"], [{"ref": "a b"}]).scores == [0.0]


def test_bleu_is_in_zero_one():
    s = run(
        similarity("bleu"),
        ["the quick brown fox jumps", "completely unrelated words here"],
        [{"ref": "the quick brown fox jumps"}, {"ref": "the quick brown fox jumps"}],
    )
    assert s.scores[0] == pytest.approx(1.0) and s.scores[0] <= 1.0
    assert s.scores[1] == pytest.approx(0.0, abs=0.05)


def test_fuzzy_match():
    s = run(
        similarity("fuzzy_match"),
        ["Hello world", "qwxz"],
        [{"ref": "Hello world"}, {"ref": "abcdefg"}],
    )
    assert s.scores[0] == pytest.approx(1.0)
    assert s.scores[1] < 0.3


def test_pass_threshold_keeps_the_raw_score_and_reports_passed():
    s = run(
        similarity("rouge_1", pass_threshold=0.5),
        ["the cat sat on the mat", "one dog", "x"],
        [{"ref": "the cat lay on a mat"}, {"ref": "the cat lay on a mat"}, {}],
    )
    assert s.scores == [pytest.approx(4 / 6), 0.0, 0.0]
    assert s.passed == [True, False, False]  # the third failed (no item.ref): never passed
    assert s.errors[2] == "item.ref: missing field"


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_metrics_needing_a_download_are_refused_with_what_is_available(metric):
    with pytest.raises(
        GraderError, match=rf"grader\.evaluation_metric: '{metric}' needs .*rouge_l"
    ):
        build(similarity(metric))


# ---------------------------------------------------------------- json_keys, regex


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('{"a": 1, "b": 2}', 1.0),
        ('  {"a": 1, "b": null}\n', 1.0),
        ('{"a": 1}', 0.0),  # b missing
        ('Sure: {"a": 1, "b": 2}', 0.0),  # text around the object fails, as in eval.checks
        ('["a", "b"]', 0.0),
        ("not json", 0.0),
    ],
)
def test_json_keys(answer, expected):
    assert run({"type": "json_keys", "name": "j", "keys": ["a", "b"]}, [answer]).scores == [
        expected
    ]


def test_regex_searches_anywhere():
    spec = {"type": "regex", "name": "r", "input": OUT, "pattern": r"\b\d{3}\b"}
    assert run(spec, ["code 123 ok", "code 12", "1234"]).scores == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------- templates


def test_templates_nested_indexed_json_and_spaces():
    spec = {
        "type": "string_check",
        "name": "t",
        "input": "{{ sample.output_json.city }}|{{item.meta.tags[1]}}|{{item.n}}|{{item.obj}}",
        "reference": 'Paris|b|3|{"x": [1, 2]}',
        "operation": "eq",
    }
    item = {"meta": {"tags": ["a", "b"]}, "n": 3, "obj": {"x": [1, 2]}}
    s = run(spec, ['{"city": "Paris"}'], [item])
    assert s.scores == [1.0] and s.errors == [None]


def test_missing_fields_are_that_samples_error_not_a_crash():
    spec = {**check("eq"), "reference": "{{item.a.b}}"}
    s = run(spec, ["x", "x", "x"], [{"a": {"b": "x"}}, {"a": {}}, {}])
    assert s.scores == [1.0, 0.0, 0.0]
    assert s.errors == [None, "item.a.b: missing field", "item.a: missing field"]
    assert s.error_count == 2


def test_output_json_is_missing_when_the_answer_is_not_an_object():
    spec = {**check("eq"), "input": "{{sample.output_json.k}}", "reference": "v"}
    s = run(spec, ['{"k": "v"}', "k: v", "[1]"])
    assert s.scores == [1.0, 0.0, 0.0]
    assert s.errors[1] == s.errors[2] == "sample.output_json.k: the answer is not a JSON object"


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ answer }}", "not a template variable"),
        ("{{ item }}", "not a template variable"),
        ("{{ items.answer }}", "not a template variable"),
        ("{{}}", "not a template variable"),
        ("{{ item.answer", "never closed"),
    ],
)
def test_template_syntax_is_checked_at_build(template, words):
    with pytest.raises(GraderError, match=rf"^grader\.reference: .*{words}"):
        build({**check("eq"), "reference": template})


# ---------------------------------------------------------------- multi


def multi(formula: str, **graders) -> dict:
    return {"type": "multi", "name": "reward", "graders": graders, "calculate_output": formula}


EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": OUT,
    "reference": "{{item.ref}}",
    "operation": "eq",
}
HAS = {"type": "string_check", "input": OUT, "reference": "{{item.ref}}", "operation": "ilike"}


def test_multi_formula_by_hand():
    spec = multi("0.7 * exact + 0.3 * has - 0.1 * (1 - has) ** 2", exact=EXACT, has=HAS)
    s = run(spec, ["Paris", "PARIS!", "Lyon"], [{"ref": "Paris"}] * 3)
    assert s.scores == [pytest.approx(1.0), pytest.approx(0.3), pytest.approx(-0.1)]
    assert s.parts == {"reward": s.scores, "exact": [1.0, 0.0, 0.0], "has": [1.0, 1.0, 0.0]}
    assert build(spec).names() == ["reward", "exact", "has"]


def test_multi_functions_by_hand():
    spec = multi(
        "max(a, b) + min(a, b, 0.25) + abs(-a) + floor(2.5) + ceil(0.2) + sqrt(4) + exp(0) + log(8, 2)",
        a=EXACT,
        b=HAS,
    )
    # a = 1, b = 1: 1 + 0.25 + 1 + 2 + 1 + 2 + 1 + 3
    assert run(spec, ["Paris"], [{"ref": "Paris"}]).scores == [pytest.approx(11.25)]


def test_multi_arithmetic_failure_and_sub_grader_failure_are_per_sample():
    spec = multi("exact / has", exact=EXACT, has=HAS)
    s = run(spec, ["Paris", "Lyon", "x"], [{"ref": "Paris"}, {"ref": "Paris"}, {}])
    assert s.scores == [1.0, 0.0, 0.0]
    assert s.errors[0] is None
    assert s.errors[1].startswith("calculate_output: ZeroDivisionError")
    assert s.errors[2] == "exact: item.ref: missing field"


def test_nested_multi_names_are_dotted():
    inner = multi("x * y", x=EXACT, y=HAS)
    spec = multi("0.5 * inner + 0.5 * e", inner=inner, e=EXACT)
    g = build(spec)
    assert g.names() == ["reward", "inner", "inner.x", "inner.y", "e"]
    s = grade(g, [{"output_text": "Paris"}], [{"ref": "Paris"}])
    assert set(s.parts) == set(g.names()) and s.scores == [1.0]


@pytest.mark.parametrize(
    "formula, token",
    [
        ("__import__('os').system('true')", "__import__('os').system"),
        ("exact.real", "exact.real"),
        ("exact ^ 2", "^"),
        ("exact % 2", "%"),
        ("other + 1", "other"),
        ("'1' + exact", "'1'"),
        ("lambda: 1", "lambda: 1"),
        ("exact if exact else 1", "exact if exact else 1"),
        ("min(exact)", "min(exact)"),
        ("[exact][0]", "[exact][0]"),
    ],
)
def test_formula_refuses_anything_else_naming_the_token(formula, token):
    with pytest.raises(GraderError, match="^grader.calculate_output: ") as e:
        build(multi(formula, exact=EXACT))
    assert token in str(e.value)


# ---------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {**EXACT, "operation": "equals"},
            "grader.operation: 'equals' is not one of eq, ne, like, ilike",
        ),
        ({**EXACT, "type": "exact"}, "grader.type: 'exact' is not one of"),
        ({k: v for k, v in EXACT.items() if k != "name"}, "grader: missing field(s) name"),
        (
            {**EXACT, "pass_treshold": 0.5},
            "grader.pass_treshold: not a field of a string_check grader",
        ),
        ({**EXACT, "pass_threshold": "high"}, "grader.pass_threshold: must be a finite number"),
        (
            {"type": "regex", "name": "r", "pattern": "("},
            "grader.pattern: '(' is not a regular expression",
        ),
        ({"type": "json_keys", "name": "j", "keys": []}, "grader.keys: must be a non-empty list"),
        (
            multi("a", a={**EXACT, "operation": "equals"}),
            "grader.graders.a.operation: 'equals' is not one of",
        ),
        (
            multi("a", a={**EXACT, "type": "multi", "graders": {}, "calculate_output": "1"}),
            "grader.graders.a.input: not a field",
        ),
        (multi("reward", reward=EXACT), "grader.graders.reward: the key repeats"),
        (multi("1", **{"two words": EXACT}), "grader.graders.two words: a sub-grader's key"),
        (multi("a"), "grader.graders: must be an object of named graders"),
        ("string_check", "grader: a grader is a JSON object"),
        ({**EXACT, "type": ["string_check"]}, "grader.type: ['string_check'] is not one of"),
        (
            similarity("bleurt"),
            "grader.evaluation_metric: 'bleurt' is not one of fuzzy_match, bleu",
        ),
        (similarity(["bleu"]), "grader.evaluation_metric: ['bleu'] is not one of"),
    ],
)
def test_bad_specs_name_the_path(spec, message):
    with pytest.raises(GraderError) as e:
        build(spec)
    assert message in str(e.value)
    assert isinstance(e.value, RayftError)  # the CLI prints it without a traceback


def test_where_prefixes_the_path():
    with pytest.raises(
        GraderError, match=r"^training\.grader\.graders\.exact\.operation: 'equals'"
    ):
        build(multi("exact", exact={**EXACT, "operation": "equals"}), where="training.grader")


def test_grade_raises_only_for_programming_errors():
    g = build(EXACT)
    with pytest.raises(ValueError, match="2 samples but 1 items"):
        grade(g, [{"output_text": "a"}, {"output_text": "b"}], [{}])
    with pytest.raises(TypeError, match="output_text"):
        grade(g, [{"text": "a"}], [{}])


# ---------------------------------------------------------------- python grader


def python(source: str, **extra) -> dict:
    return {"type": "python", "name": "py", "source": source, **extra}


GOOD = """
import json

def grade(sample, item):
    print("graders may print")  # must not corrupt the answer on stdout
    want = item["answer"]
    got = sample["output_json"]["answer"] if "output_json" in sample else sample["output_text"]
    return 1.0 if got == want else 1 / len(want)
"""


def test_python_grader_scores_a_batch():
    s = run(
        python(GOOD),
        ["42", '{"answer": "42"}', "7", "x"],
        [{"answer": "42"}, {"answer": "42"}, {"answer": "42"}, {"answer": ""}],
        allow_python=True,
    )
    assert s.scores[:3] == [1.0, 1.0, 0.5]
    assert s.errors[:3] == [None, None, None]
    assert s.errors[3] == "python grader: ZeroDivisionError: division by zero"  # only that one
    assert s.scores[3] == 0.0 and s.error_count == 1


def test_python_grader_return_must_be_a_number():
    src = "def grade(sample, item):\n    return {'a': 'yes', 'b': float('nan')}.get(sample['output_text'], 3)\n"
    s = run(python(src), ["a", "b", "c"], allow_python=True)
    assert s.scores == [0.0, 0.0, 3.0]
    assert "grade returned str" in s.errors[0] and "not a finite number" in s.errors[1]


def test_python_grader_that_fails_to_load_fails_every_sample():
    s = run(
        python("import no_such_module_here\ndef grade(s, i):\n    return 1\n"),
        ["a", "b"],
        allow_python=True,
    )
    assert s.error_count == 2
    assert "ModuleNotFoundError" in s.errors[0]


def test_python_grader_timeout_fails_the_batch_and_returns_promptly():
    # The grader starts a grandchild holding the pipes: the whole process group must die.
    src = (
        "import subprocess, sys, time\n"
        "def grade(sample, item):\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "    time.sleep(60)\n"
    )
    g = build(python(src, timeout_s=1), allow_python=True)
    start = time.monotonic()
    s = grade(g, [{"output_text": "a"}, {"output_text": "b"}], [{}, {}])
    assert time.monotonic() - start < 1 + 2
    assert s.scores == [0.0, 0.0] and s.error_count == 2
    assert "timed out after 1 s" in s.errors[0]


def test_python_grader_is_refused_unless_allowed():
    with pytest.raises(
        GraderError, match="only from a local job file.*never from a request to the server"
    ):
        build(python(GOOD))
    with pytest.raises(GraderError, match=r"grader\.graders\.p: python graders run only"):
        build(multi("p", p=python(GOOD)))


@pytest.mark.parametrize(
    "source, message",
    [
        ("def grade(sample, item)\n    return 1\n", r"grader\.source: line 1: "),
        (
            "def score(sample, item):\n    return 1\n",
            r"grader\.source: defines no top-level `def grade",
        ),
    ],
)
def test_python_grader_source_is_checked_at_build(source, message):
    with pytest.raises(GraderError, match=message):
        build(python(source), allow_python=True)


# ---------------------------------------------------------------- model graders, real HTTP


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        prompt = "\n".join(m["content"] for m in body["messages"])
        reply = next((r for key, r in server.replies.items() if key in prompt), "unexpected prompt")
        data = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    """A real OpenAI-compatible chat endpoint: replies[key] answers any prompt containing key."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.replies = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "grader-model",
    "input": [
        {"role": "system", "content": "Score the answer from 0 to 10."},
        {"role": "user", "content": "Question: {{item.question}}\nAnswer: {{sample.output_text}}"},
    ],
    "range": [0, 10],
    "sampling_params": {"temperature": 0, "max_completions_tokens": 8, "seed": 3},
}


def test_score_model_normalises_the_reply_and_sends_the_rendered_prompt(judge):
    judge.replies.update(
        {
            "ANS-A": "7",
            "ANS-B": "Score: 15/10",
            "ANS-C": "no number",
            "ANS-D": '{"steps": [1, 2], "result": 2.5}',
        }
    )
    s = run(
        SCORE, ["ANS-A", "ANS-B", "ANS-C", "ANS-D"], [{"question": "Q?"}] * 4, base_url=judge.url
    )
    assert s.scores == [pytest.approx(0.7), 1.0, 0.0, pytest.approx(0.25)]  # 15 is clamped to 10
    assert s.errors[:2] == [None, None] and s.errors[3] is None
    assert s.errors[2] == "score_model: no number in reply 'no number'"
    sent = next(r for r in judge.requests if "ANS-A" in json.dumps(r["body"]))
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "grader-model"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "Score the answer from 0 to 10."},
        {"role": "user", "content": "Question: Q?\nAnswer: ANS-A"},
    ]
    assert sent["body"]["temperature"] == 0 and sent["body"]["seed"] == 3
    assert sent["body"]["max_completion_tokens"] == 8
    assert len(judge.requests) == 4


def test_model_grader_key_comes_from_the_named_environment_variable(judge, monkeypatch):
    judge.replies["ANS"] = "1"
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", "sk-test-123")
    spec = {**SCORE, "base_url": judge.url, "api_key_env": "RAYFT_TEST_JUDGE_KEY"}
    s = run(spec, ["ANS"], [{"question": "q"}], base_url="http://127.0.0.1:9/unused")
    assert s.scores == [pytest.approx(0.1)]
    assert judge.requests[0]["auth"] == "Bearer sk-test-123"
    monkeypatch.delenv("RAYFT_TEST_JUDGE_KEY")
    with pytest.raises(
        GraderError, match=r"grader\.api_key_env: \$RAYFT_TEST_JUDGE_KEY is not set"
    ):
        build(spec)
    with pytest.raises(GraderError, match=r"grader\.api_key: a key does not belong in a job file"):
        build({**SCORE, "api_key": "sk-literal"}, base_url=judge.url)


def test_model_grader_template_error_skips_the_call(judge):
    judge.replies["ANS"] = "5"
    s = run(SCORE, ["ANS", "ANS"], [{"question": "q"}, {}], base_url=judge.url)
    assert s.scores == [0.5, 0.0] and s.errors[1] == "item.question: missing field"
    assert len(judge.requests) == 1


def test_unreachable_endpoint_errors_every_sample_without_raising():
    spec = {**SCORE, "timeout_s": 2}
    s = run(spec, ["a", "b"], [{"question": "q"}] * 2, base_url="http://127.0.0.1:9/v1")
    assert s.error_count == 2 and s.scores == [0.0, 0.0]
    assert (
        "score_model: the request to http://127.0.0.1:9/v1 (model grader-model) failed"
        in s.errors[0]
    )


def test_score_model_needs_an_endpoint_and_a_valid_range():
    with pytest.raises(GraderError, match="needs an OpenAI-compatible endpoint"):
        build(SCORE)
    with pytest.raises(GraderError, match=r"grader\.range: must be \[min, max\] with min < max"):
        build({**SCORE, "range": [10, 0]}, base_url="http://x/v1")
    with pytest.raises(
        GraderError, match=r"grader\.sampling_params\.top_k: not a sampling parameter"
    ):
        build({**SCORE, "sampling_params": {"top_k": 3}}, base_url="http://x/v1")
    with pytest.raises(
        GraderError, match=r"grader\.input\[1\]\.content: .*not a template variable"
    ):
        build(
            {**SCORE, "input": [SCORE["input"][0], {"role": "user", "content": "{{ x }}"}]},
            base_url="http://x/v1",
        )


LABEL = {
    "type": "label_model",
    "name": "tone",
    "model": "grader-model",
    "input": [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Label the tone of: {{sample.output_text}}"}
            ],
        }
    ],
    "labels": ["positive", "neutral", "negative"],
    "passing_labels": ["positive", "neutral"],
}


def test_label_model(judge):
    judge.replies.update(
        {"happy": "Positive", "meh": " **neutral**.\nbecause...", "sad": "negative", "odd": "maybe"}
    )
    s = run(LABEL, ["happy", "meh", "sad", "odd"], base_url=judge.url)
    assert s.scores == [1.0, 1.0, 0.0, 0.0]
    assert s.errors[:3] == [None, None, None]
    assert (
        s.errors[3]
        == "label_model: reply 'maybe' is none of the labels positive, neutral, negative"
    )
    sent = next(r for r in judge.requests if "happy" in json.dumps(r["body"]))
    assert sent["body"]["messages"] == [{"role": "user", "content": "Label the tone of: happy"}]
    assert sent["body"]["model"] == "grader-model"


def test_label_model_passing_labels_must_be_labels():
    with pytest.raises(GraderError, match=r"grader\.passing_labels: 'good' is not one of labels"):
        build({**LABEL, "passing_labels": ["good"]}, base_url="http://x/v1")


def test_multi_over_a_model_grader_and_a_check(judge):
    judge.replies.update({"Paris": "8"})
    spec = multi("0.5 * exact + 0.5 * judge", exact=EXACT, judge=SCORE)
    s = run(spec, ["Paris"], [{"ref": "Paris", "question": "capital?"}], base_url=judge.url)
    assert s.scores == [pytest.approx(0.9)]
    assert s.parts == {"reward": s.scores, "exact": [1.0], "judge": [pytest.approx(0.8)]}


def test_built_graders_pickle(judge):
    # Ray ships rewards to workers by pickling them.
    spec = multi("a + b + c", a=EXACT, b=python(GOOD), c=SCORE)
    g = pickle.loads(pickle.dumps(build(spec, allow_python=True, base_url=judge.url, api_key="k")))
    judge.replies["42"] = "10"
    s = grade(g, [{"output_text": "42"}], [{"ref": "42", "answer": "42", "question": "q"}])
    assert s.scores == [pytest.approx(3.0)] and s.errors == [None]
