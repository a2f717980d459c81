"""Checkpoint resolution and strict loading: local folders, hub ids through a local cache, bad repos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffserve import Engine
from diffserve.errors import CheckpointError
from diffserve.models.loader import resolve_model_path


def _copy(repo: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(repo, dst)
    return dst


def _load(path: Path) -> Engine:
    return Engine.from_pretrained(str(path), dtype="fp32", device="cpu")


def test_hub_id_resolves_from_local_cache(flux_dev_repo: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--diffserve-test--tiny-flux" / "snapshots" / revision
    shutil.copytree(flux_dev_repo, snap)
    (cache / "models--diffserve-test--tiny-flux" / "refs").mkdir()
    (cache / "models--diffserve-test--tiny-flux" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("diffserve-test/tiny-flux") == snap
    engine = _load("diffserve-test/tiny-flux")  # type: ignore[arg-type]
    assert engine.pipeline_class == "FluxPipeline"
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_model_path("diffserve-test/not-there")


def test_missing_folder_and_non_repo_id() -> None:
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_model_path("./does/not/exist")


def test_unknown_pipeline_class_lists_supported(flux_dev_repo: Path, tmp_path: Path) -> None:
    repo = _copy(flux_dev_repo, tmp_path)
    index = json.loads((repo / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (repo / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not supported; supported: .*FluxPipeline"):
        _load(repo)


def test_missing_component_folder(flux_dev_repo: Path, tmp_path: Path) -> None:
    repo = _copy(flux_dev_repo, tmp_path)
    shutil.rmtree(repo / "vae")
    with pytest.raises(CheckpointError, match="component folder 'vae' is missing"):
        _load(repo)


def test_missing_weight_file(flux_dev_repo: Path, tmp_path: Path) -> None:
    repo = _copy(flux_dev_repo, tmp_path)
    (repo / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        _load(repo)


def _edit_weights(repo: Path, edit) -> None:
    f = repo / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "mis-shaped"])
def test_bad_weight_keys(flux_dev_repo: Path, tmp_path: Path, kind: str) -> None:
    repo = _copy(flux_dev_repo, tmp_path)

    def edit(state: dict[str, torch.Tensor]) -> None:
        if kind == "missing":
            del state["proj_out.weight"]
        elif kind == "unexpected":
            state["extra.weight"] = torch.zeros(2)
        else:
            state["proj_out.bias"] = torch.zeros(3)

    _edit_weights(repo, edit)
    with pytest.raises(CheckpointError, match=f"{kind} keys: "):
        _load(repo)


def test_sharded_weights_load(flux_dev_repo: Path, tmp_path: Path) -> None:
    repo = _copy(flux_dev_repo, tmp_path)
    f = repo / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    f.unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, repo / "transformer" / name)
        weight_map.update({k: name for k in ks})
    (repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    engine = _load(repo)
    loaded = engine.pipeline.components.transformer.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in keys)
    (repo / "transformer" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard"):
        _load(repo)
