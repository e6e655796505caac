"""/v1/files: upload (multipart, streamed to disk), list, get, content, delete. A tenant sees
only its own files; another tenant's id is answered as an unknown one (404)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from rayft.serving.errors import BadRequest
from rayft.serving.ft_api import file_object, only_query, page
from rayft.serving.state import State

router = APIRouter(prefix="/v1/files")


@router.post("")
async def upload(request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    tenant = st.owner(request)
    limit = int(svc.ft.max_file_mb * 1e6)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:  # + form framing
        raise BadRequest(
            f"file: the upload is {int(declared) / 1e6:.1f} MB, above the server's limit of "
            f"{svc.ft.max_file_mb:g} MB (serve.fine_tuning.max_file_mb)",
            "file",
            "file_too_large",
        )
    # Starlette spools the parts to temporary files past 1 MB: nothing large stays in memory,
    # and the body is counted as it arrives, so a chunked upload (no Content-Length) is cut at
    # the limit instead of being spooled whole first.
    seen = 0

    async def counted():
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit + 64 * 1024:
            raise BadRequest(
                f"file: larger than the server's limit of {svc.ft.max_file_mb:g} MB "
                "(serve.fine_tuning.max_file_mb)",
                "file",
                "file_too_large",
            )
        return message

    form = await Request(request.scope, counted).form(max_files=1, max_fields=8)
    try:
        extra = sorted(set(form) - {"file", "purpose"})
        if extra:  # e.g. expires_after: files here live until deleted
            raise BadRequest(
                f"Unrecognized request argument supplied: {extra[0]}", extra[0], "unknown_parameter"
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("file: send the file as multipart form field `file`", "file")
        purpose = form.get("purpose")
        if not isinstance(purpose, str):
            raise BadRequest("purpose: required (`fine-tune`)", "purpose")
        row = await asyncio.to_thread(svc.add_file, tenant, upload.filename, purpose, upload.file)
    finally:
        await form.close()
    return file_object(row)


@router.get("")
async def list_files(
    request: Request,
    st: State,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    order: str = "desc",
) -> dict:
    svc = st.fine_tuning()
    only_query(request, "purpose", "after", "limit", "order")
    tenant = st.tenant(request)
    if order not in ("asc", "desc") or not 1 <= limit <= 10000:
        raise BadRequest("order is asc or desc, limit 1 to 10000", "order")
    equal = {"purpose": purpose} if purpose else {}
    rows, more = await asyncio.to_thread(
        svc.store.page, "files", tenant=tenant, after=after, limit=limit,
        newest_first=order == "desc", **equal,
    )  # fmt: skip
    return page(rows, more, file_object)


@router.get("/{file_id}")
async def get_file(file_id: str, request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    return file_object(await asyncio.to_thread(svc.file, st.tenant(request), file_id))


@router.get("/{file_id}/content")
async def content(file_id: str, request: Request, st: State) -> FileResponse:
    svc = st.fine_tuning()
    row = await asyncio.to_thread(svc.file, st.tenant(request), file_id)
    media = "text/csv" if row["path"].endswith(".csv") else "application/jsonl"
    return FileResponse(row["path"], media_type=media)


@router.delete("/{file_id}")
async def delete(file_id: str, request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    await asyncio.to_thread(svc.delete_file, st.tenant(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}
