"""LoRA adapters over HTTP: ``GET /v1/loras`` lists the adapters the worker has loaded, ``POST /v1/loras``
loads one more from ``--lora-dir``, and `request_lora` checks the ``lora`` field of a generation request.

Where adapters come from: ``--lora-path PATH[:SCALE]`` (the start-up set: merged into the weights with
``--lora-mode merged``, else the adapters a request that leaves ``lora`` out runs with), every LoRA in
``--lora-dir DIR`` (selectable by name; unmerged mode), and ``POST /v1/loras`` with
``{"path": "style.safetensors", "name": "style"}`` (``name`` optional: the file's name; ``path`` relative to
``--lora-dir`` or absolute inside it: anything that resolves outside it, symbolic links included, is refused
with 400 ``path_outside_lora_dir``). A load runs in the worker between batches and answers the new entry; a
restarted worker loads the same set again.

A request naming an adapter that is not loaded is a 400 naming the loaded ones; with ``--lora-mode merged`` a
request may only ask for the merged set (a 400 says to start with ``--lora-mode unmerged``). The resolved set
goes into the request (`GenerationRequest.lora`), so only requests with the same set are batched together.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from diffserve.config import GenerationRequest
from diffserve.errors import UserError
from diffserve.lora.spec import LoraSpec, check_name, default_name, resolve_lora
from diffserve.server.protocol import APIError, _Body, from_user_error
from diffserve.server.runtime import Runtime

router = APIRouter()


class LoraLoadBody(_Body):
    """`POST /v1/loras`: a LoRA file (or diffusers LoRA folder) inside --lora-dir, and the name requests use."""

    path: str
    name: str | None = None


def request_lora(rt: Runtime, req: GenerationRequest) -> GenerationRequest:
    """`req` with `lora` resolved to the `LoraSet` it runs with (left out: the start-up set), checked against
    the worker's loaded adapters and LoRA mode; a 400 naming the loaded adapters otherwise."""
    names, default = rt.supervisor.lora_state()
    try:
        return req.replace(lora=resolve_lora(req.lora, names, default, rt.supervisor.lora_mode))
    except UserError as e:
        raise from_user_error(e) from None


def lora_dir_path(lora_dir: Path | None, given: str) -> Path:
    """The file or folder `given` names inside `lora_dir` (relative to it, or absolute), resolved; a 400 when
    there is no --lora-dir, the path resolves outside it, or nothing is there."""
    if lora_dir is None:
        raise APIError(400, "this server loads LoRAs only from its --lora-dir, and it was started without one; "
                            "start it with --lora-dir DIR (and --lora-mode unmerged)", param="path",
                       code="no_lora_dir")
    root = lora_dir.resolve()
    target = (root / given).resolve()
    if root not in target.parents:
        raise APIError(400, f"path {given!r} is outside --lora-dir; give a file inside it (relative to it)",
                       param="path", code="path_outside_lora_dir")
    if not target.exists():
        raise APIError(400, f"no file or folder {given!r} in --lora-dir", param="path", code="lora_not_found")
    return target


def _entry(info: dict[str, Any]) -> dict[str, Any]:
    return {"object": "lora", **info}


@router.get("/loras")
async def list_loras(request: Request) -> dict[str, Any]:
    """The loaded LoRA adapters: name, path, scale (the one it was loaded with), whether requests get it by
    default, layout, ranks, target layers (`target_modules`, block indices folded)."""
    rt: Runtime = request.app.state.runtime
    rt.defaults()  # 503 while the model is loading
    info = rt.supervisor.info
    return {"object": "list", "mode": rt.supervisor.lora_mode,
            "lora_dir": str(rt.config.lora_dir) if rt.config.lora_dir is not None else None,
            "data": [_entry(i) for i in (info.loras if info else [])]}


@router.post("/loras")
async def load_lora(body: LoraLoadBody, request: Request) -> dict[str, Any]:
    """Load a LoRA from --lora-dir while serving (``--lora-mode unmerged``): body ``{"path", "name"}`` (name
    optional: the file's name). Answers its GET /v1/loras entry once the worker has loaded it (between
    batches); requests then select it with ``"lora": [{"name": NAME, "scale": SCALE}]``."""
    rt: Runtime = request.app.state.runtime
    rt.defaults()
    if rt.supervisor.lora_mode != "unmerged":
        raise APIError(400, "this server merged its LoRAs into the weights at start-up (--lora-mode merged); "
                            "start it with --lora-mode unmerged to load adapters while serving", param="path",
                       code="lora_mode_merged")
    target = lora_dir_path(rt.config.lora_dir, body.path)
    try:
        name = check_name(body.name) if body.name is not None else default_name(target)
    except UserError as e:
        raise APIError(400, str(e), param="name") from None
    names, _ = rt.supervisor.lora_state()
    if name in names:
        raise APIError(409, f"a LoRA named {name!r} is already loaded; give another name", param="name",
                       code="lora_exists")
    info = await asyncio.wrap_future(rt.supervisor.load_lora(LoraSpec(path=str(target), name=name)))
    return _entry(info)
