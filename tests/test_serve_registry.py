"""The serving registry's name, arm and weight rules, its persistence, and the request-shape
rules of the OpenAI models: plain Python, no Serve."""

from __future__ import annotations

import pytest

from rayft.serving import openai_api as oa
from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.protocol import AdapterRef
from rayft.serving.registry import Registry


def registry(tmp_path=None) -> Registry:
    r = Registry("tiny-llama", path=tmp_path / "adapters.json" if tmp_path else None)
    r.add_model("m1")
    r.add_adapter(AdapterRef("a1", "/a1", "k1"))
    r.add_merged("d1", "/d1", "/merged/d1", None)
    r.add_experiment("exp", {"base": 1, "a1": 1}, "d1")
    return r


@pytest.mark.parametrize(
    "name,holder", [("base", "the base"), ("tiny-llama", "the base"), ("m1", "a model"),
                    ("a1", "an adapter"), ("d1", "an adapter"), ("exp", "an experiment")],
)  # fmt: skip
def test_a_name_means_one_thing(name, holder):
    """Each kind of name refuses the others; only a reload of its own kind replaces it."""
    r = registry()
    adds = {
        "a model": lambda: r.add_model(name),
        "an adapter": lambda: r.add_adapter(AdapterRef(name, "/x", "k")),
        "an experiment": lambda: r.add_experiment(name, {"m1": 1}, None),
    }
    for kind, add in adds.items():
        if kind == holder and kind != "a model":
            continue  # a reload (see the tests below)
        with pytest.raises(BadRequest, match=f"name {name!r} is taken by {holder}") as e:
            add()
        assert e.value.param == "name"


def test_adapters_reload_and_switch_between_hot_and_merged():
    r = registry()
    r.add_adapter(AdapterRef("a1", "/a1", "k2"))  # the same name, new files
    assert r.adapters["a1"].key == "k2"
    assert r.add_merged("a1", "/a1", "/merged/a1", "rayft-merged-a1") is None
    assert "a1" not in r.adapters and r.route("a1", None)[0].engine == "a1"
    r.add_adapter(AdapterRef("a1", "/a1", "k3"))  # back to hot-loaded
    assert "a1" not in r.merged and r.route("a1", None)[0].adapter.key == "k3"


def test_experiment_arms_are_existing_models_never_experiments():
    r = registry()
    with pytest.raises(BadRequest, match="is an experiment") as e:
        r.add_experiment("e2", {"exp": 1}, None)
    assert e.value.param == "arms"
    with pytest.raises(BadRequest, match="is an experiment"):
        r.add_experiment("e2", {"e2": 1}, None)
    with pytest.raises(NotFound, match=r"arm 'nope' is neither") as e:
        r.add_experiment("e2", {"base": 1}, "nope")
    assert (e.value.param, e.value.code) == ("arms", "model_not_found")
    r.add_experiment("e2", {"tiny-llama:a1": 2, "base:a1": 1, "tiny-llama": 1}, "d1")
    # every spelling of an arm is kept under its own name, so unloading sees it
    assert r.experiments["e2"] == {"arms": {"a1": 3, "base": 1}, "shadow": "d1"}
    r.remove_experiment("exp")
    with pytest.raises(BadRequest, match=r"arm of experiment\(s\) \['e2'\]"):
        r.remove_adapter("a1")
    r.add_experiment("e2", {"m1": 1}, None)  # re-created: replaced
    assert r.experiments["e2"] == {"arms": {"m1": 1}, "shadow": None}
    r.add_experiment("exp", {"base": 1, "a1": 1}, "d1")
    answer, shadow = r.route("exp", "user-1")
    assert answer.experiment == "exp" and shadow.arm == "d1" and shadow.engine == "d1"


def test_an_arm_cannot_be_removed_from_under_its_experiment():
    r = registry()
    for name in ("a1", "d1"):  # an answering arm, a shadow arm
        with pytest.raises(BadRequest, match="arm of experiment"):
            r.remove_adapter(name)
    r.remove_experiment("exp")
    assert r.remove_adapter("a1") is None
    assert r.remove_adapter("d1") == {"adapter": "/d1", "model": "/merged/d1", "app": None}
    with pytest.raises(NotFound):
        r.remove_adapter("d1")
    with pytest.raises(NotFound):
        r.remove_experiment("exp")


def test_state_persists_and_restores(tmp_path):
    r = registry(tmp_path)
    r.save()
    again = Registry("tiny-llama", models={"m1"}, path=tmp_path / "adapters.json")
    assert again.restore()
    assert (again.adapters, again.merged, again.experiments) == (
        r.adapters,
        r.merged,
        r.experiments,
    )
    assert not Registry("x", path=tmp_path / "none.json").restore()


@pytest.mark.parametrize(
    "body,param,message",
    [
        ({"stream": True, "n": 2}, "n", "stream=true supports n=1 only"),
        ({"n": 5}, "n", "above this server's limit of 4"),
        ({"max_tokens": 65}, "max_tokens", "above this server's limit of 64"),
        ({"max_completion_tokens": 65}, "max_completion_tokens", "limit of 64"),
        ({"max_tokens": 2.5}, "max_tokens", "integer"),
        ({"seed": 2**64}, "seed", "less than or equal"),  # no engine can seed with it
    ],
)
def test_request_shape_rules_refuse_before_routing(body, param, message):
    full = {"model": "exp", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(BadRequest, match=message) as e:
        oa.parse(oa.ChatRequest, full, max_n=4, max_tokens_limit=64)
    assert e.value.param == param
    ok = oa.parse(oa.ChatRequest, {**full, **{k: 1 for k in body if k != "stream"}}, max_n=4)
    assert ok.n == 1


@pytest.mark.parametrize(
    "arms",
    [{}, {"base": 0}, {"base": -1, "a1": 2}],
)
def test_experiment_weights_are_the_job_files_rule(arms):
    with pytest.raises(BadRequest) as e:
        oa.parse(oa.ExperimentSpec, {"name": "e", "arms": arms})
    assert e.value.param == "arms"
