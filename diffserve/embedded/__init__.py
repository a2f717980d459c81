"""Models diffserve trained itself and ships (tools/train_embedded), used when no --model-path is given.

They are small diffusers-format repos of the real architectures (FLUX for images, Wan2.1 for videos),
trained on procedurally generated scenes of coloured shapes (`tools.train_embedded.shapes`), so the main
command works on any machine with no download.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from diffserve.errors import UserError

ROOT = Path(__file__).parent
EMBEDDED = {"image": ROOT / "shapes-image", "video": ROOT / "shapes-video"}


def embedded_model(kind: Literal["image", "video"]) -> Path | None:
    """The shipped model folder for `kind`, or None when this build ships none."""
    path = EMBEDDED[kind]
    return path if (path / "model_index.json").is_file() else None


ALIASES: dict[str, Literal["image", "video"]] = {"embedded:image": "image", "embedded:video": "video"}


def resolve_model_arg(model_path: str | None, kind: Literal["image", "video"], announce: bool = True) -> str:
    """`model_path` as given; the embedded model of `kind` when it is None (announced on stderr in one
    line); the named embedded model for ``embedded:image`` / ``embedded:video``."""
    if model_path is not None and model_path not in ALIASES:
        return model_path
    named = model_path is not None
    kind = ALIASES[model_path] if model_path is not None else kind
    path = embedded_model(kind)
    if path is None:
        asked = f"--model-path {model_path}" if named else "no --model-path given"
        raise UserError(f"{asked}, and this diffserve ships no embedded {kind} model; pass --model-path with a "
                        f"diffusers-format folder or a Hugging Face repo id (org/name)")
    if announce and not named:
        print(f"diffserve: no --model-path given: using the embedded {kind} model (coloured shapes, {path.name}); "
              f"pass --model-path FOLDER_OR_ORG/NAME for a real checkpoint", file=sys.stderr)
    return str(path)
