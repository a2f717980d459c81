"""Trainers for diffserve's embedded default models (small FLUX-architecture text-to-image, and later a
Wan-architecture text-to-video model), trained on the procedural scenes of ``tools.train_embedded.shapes``.

Run from the repository root, e.g. ``python -m tools.train_embedded.image --out runs/image --minutes 8.5
--device cuda``; see ``tools/train_embedded/README.md``.
"""
