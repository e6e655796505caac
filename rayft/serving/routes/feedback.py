"""POST /v1/feedback: a rating or a pairwise preference on an answered request, kept with the
experiment and arm that answered it (for `rayft ab report`)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from fastapi import APIRouter, Request

from rayft.serving import openai_api as oa
from rayft.serving.ab import read_jsonl
from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.state import IngressState, State

router = APIRouter()


@router.post("/v1/feedback")
async def post_feedback(request: Request, st: State) -> dict:
    st.auth(request)
    fb = oa.parse(oa.FeedbackRequest, await st.body(request))
    if fb.rating is None and fb.preferred_over is None:
        raise BadRequest("Give a rating, a preferred_over response id, or both", "rating")
    known = _record(st, fb.response_id)
    if known is None:
        raise NotFound(f"No response with id {fb.response_id!r}", "response_id")
    if fb.preferred_over is not None and _record(st, fb.preferred_over) is None:
        raise NotFound(f"No response with id {fb.preferred_over!r}", "preferred_over")
    st.feedback.write({**fb.model_dump(), "experiment": known["experiment"], "arm": known["arm"]})
    return {"status": "recorded", "response_id": fb.response_id, "arm": known["arm"]}


def _record(st: IngressState, rid: str) -> dict | None:
    if rid in st.arm_of:
        return st.arm_of[rid]
    return next(
        (r for r in read_jsonl(st.requests.path) if r["id"] == rid and not r.get("shadow")), None
    )
