"""Issue 16 on the server: per-request LoRA sets (`lora` field, GET/POST /v1/loras, --lora-dir, batching by
set, replay after a worker restart), generation metadata in served files (--no-metadata), the model card of
GET /v1/models, and the busy-port line of `diffserve serve`.

One real server (subprocess) on diffserve's embedded image model in unmerged mode serves the end-to-end
tests; its outputs are compared with an in-process engine built by the worker's own loader (`_load`) with the
same LoRAs, which also shows a restarted worker loading the adapters added while serving again. Random LoRAs
are built with peft as in tests/test_lora.py (its helpers). The merged-mode refusals, the scheduler's
batching, the supervisor's LoRA loads and the metadata switch are checked without a model (stub app,
scheduler, supervisor with a fake worker pipe, the worker's batch runner)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from test_lora import peft_lora, save_diffusers

from diffserve import Engine
from diffserve.config import GenerationRequest, ModelDefaults
from diffserve.embedded import embedded_model
from diffserve.lora import LoraSet, LoraSpec
from diffserve.media import read_metadata
from diffserve.models_catalog import card_for_folder
from diffserve.server.messages import LoadLora, LoraLoaded, OutputSpec, Ready, WorkerConfig
from diffserve.server.protocol import APIError, ImageEditBody
from diffserve.server.scheduler import Scheduler, WorkItem
from diffserve.server.supervisor import WorkerSupervisor
from diffserve.server.testing import assert_error, start_server, stub_app
from diffserve.server.worker import load_engine

KEY = "sk-test-lora"
PROMPT = "a red circle on blue"
SIZE = 32
STEPS = 2
SEED = 11
REPO = embedded_model("image")

pytestmark = pytest.mark.skipif(REPO is None, reason="this build ships no embedded image model")


class Events(list):
    """An event pipe that keeps what is sent."""

    def send(self, msg: object) -> None:
        self.append(msg)


def _lora(folder: Path, seed: int) -> Path:
    """A random diffusers-format LoRA (rank 4) on every Linear of the embedded model's transformer."""
    model = FluxTransformer2DModel.from_pretrained(REPO / "transformer")  # type: ignore[operator]
    return save_diffusers(FluxPipeline, folder, *peft_lora(model, seed, 4, 8.0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """--lora-dir holding `style` (a diffusers LoRA folder); `late` waits outside it until a test copies it
    in. The server starts loading, and meanwhile the worker's loader builds the reference engine as a
    restarted worker would after `late` was added: --lora-dir's `style`, then `late` and a file since
    deleted replayed."""
    tmp = tmp_path_factory.mktemp("server-lora")
    lora_dir, spare = tmp / "loras", tmp / "spare"
    style = _lora(lora_dir / "style", seed=1)
    late = _lora(spare / "late", seed=2) / "pytorch_lora_weights.safetensors"
    server = start_server(REPO, tmp / "srv", api_key=KEY, wait=False, args=(
        "--dtype", "fp32", "--device", "cpu", "--lora-mode", "unmerged", "--lora-dir", str(lora_dir),
        "--max-batch-size", "4", "--log-level", "warning"))
    try:
        events = Events()
        replay = (LoraSpec(str(late)), LoraSpec(str(spare / "gone.safetensors")))
        cfg = WorkerConfig(str(REPO), dtype="fp32", device="cpu", lora_mode="unmerged",
                           lora_dir_loras=(LoraSpec(str(style)),), replay_loras=replay)
        engine = load_engine(cfg, events)
        server.wait_ready()
    except BaseException:
        server.stop(10)
        raise
    yield {"server": server, "engine": engine, "ready": events[-1], "lora_dir": lora_dir, "late": late}
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def client(setup: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{setup['server'].url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(setup: dict):
    with httpx.Client(base_url=setup["server"].url, headers=setup["server"].headers, timeout=120) as c:
        yield c


def _generate(client: openai.OpenAI, fmt: str = "b64_json", **extra) -> Image.Image:
    """One image through the openai SDK (the extensions in extra_body); the decoded PNG with its text."""
    out = client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}", response_format=fmt,  # type: ignore
                                 extra_body={"seed": SEED, "num_inference_steps": STEPS, **extra})
    data = base64.b64decode(out.data[0].b64_json) if fmt == "b64_json" else httpx.get(out.data[0].url).content
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _engine_pixels(engine: Engine, lora: object) -> np.ndarray:
    res = engine.generate(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=SEED, lora=lora,
                          progress=False)
    return np.asarray(res.images[0], dtype=int)


def test_lora_request_changes_the_image_and_equals_the_engine(setup: dict, client: openai.OpenAI) -> None:
    base = _generate(client)
    styled = _generate(client, fmt="url", lora=[{"name": "style", "scale": 0.8}])
    got_base, got_styled = np.asarray(base, dtype=int), np.asarray(styled, dtype=int)
    assert np.abs(got_styled - got_base).max() > 8  # the LoRA matters
    diff = int(np.abs(got_styled - _engine_pixels(setup["engine"], "style:0.8")).max())
    print(f"server vs in-process engine, lora style:0.8: max |uint8 diff| = {diff}")
    assert diff <= 1
    # the generation parameters ride in the PNGs' text chunks (url and b64 alike)
    meta = styled.text  # type: ignore[attr-defined]
    assert meta["prompt"] == PROMPT and meta["seed"] == str(SEED) and meta["steps"] == str(STEPS)
    assert meta["size"] == f"{SIZE}x{SIZE}" and meta["lora"] == "style:0.8" and meta["model"] == "shapes-image"
    assert base.text == {k: v for k, v in meta.items() if k != "lora"}  # type: ignore[attr-defined]


def test_unknown_or_malformed_lora_is_a_400(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _generate(client, lora="nope:0.5")
    assert "no LoRA named 'nope' is loaded (loaded: style" in str(e.value)
    body = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}"}
    assert_error(http.post("/v1/images/generations", json={**body, "lora": {"style": 1}}), 400, param="lora")
    assert_error(http.post("/v1/images/generations", json={**body, "lora": "style:lots"}), 400, param="lora")
    assert_error(http.post("/v1/videos", json={**body, "lora": "nope"}), 400)  # an image model: refused anyway


def test_post_lora_from_the_folder_then_use_it(setup: dict, client: openai.OpenAI, http: httpx.Client) -> None:
    lora_dir = setup["lora_dir"]
    shutil.copy(setup["late"], lora_dir / "late.safetensors")
    os.symlink(setup["late"], lora_dir / "link.safetensors")
    for path in ("../spare/late/pytorch_lora_weights.safetensors", str(setup["late"]), "link.safetensors"):
        assert_error(http.post("/v1/loras", json={"path": path}), 400, param="path", code="path_outside_lora_dir")
    assert_error(http.post("/v1/loras", json={"path": "missing.safetensors"}), 400, code="lora_not_found")
    r = http.post("/v1/loras", json={"path": "late.safetensors"})
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["name"] == "late" and entry["ranks"] == [4] and entry["default"] is False
    assert_error(http.post("/v1/loras", json={"path": "late.safetensors"}), 409, code="lora_exists")
    listed = http.get("/v1/loras").json()
    assert listed["mode"] == "unmerged" and [e["name"] for e in listed["data"]] == ["style", "late"]
    style = listed["data"][0]
    assert style["path"].endswith("style") and style["scale"] == 1.0 and style["layout"] == "diffusers"
    assert "transformer_blocks.*.attn.to_q" in style["target_modules"]
    late = np.asarray(_generate(client, lora=["late:0.5"]), dtype=int)
    assert np.abs(late - np.asarray(_generate(client, lora=[]), dtype=int)).max() > 8
    assert int(np.abs(late - _engine_pixels(setup["engine"], "late:0.5")).max()) <= 1


def test_restarted_worker_loads_the_added_loras_again(setup: dict) -> None:
    """The reference engine was built by the worker's loader with `late` replayed (and a deleted file, left
    out): its Ready lists the --lora-dir adapter and the replayed one."""
    ready = setup["ready"]
    assert isinstance(ready, Ready) and ready.lora_mode == "unmerged"
    assert [(e["name"], e["default"]) for e in ready.loras] == [("style", False), ("late", False)]


def test_models_card_is_the_catalog_card_with_loras(setup: dict, http: httpx.Client) -> None:
    card = http.get("/v1/models").json()["data"][0]
    catalog = card_for_folder(REPO, card["id"])  # type: ignore[arg-type]
    for key in ("id", "object", "kind", "pipeline", "defaults", "accepts"):
        assert card[key] == catalog[key], key
    assert card["lora_mode"] == "unmerged" and card["loras"][0] == {"name": "style", "scale": 1.0,
                                                                    "default": False}
    assert card["limits"]["max_batch_size"] == 4
    assert http.get(f"/v1/models/{card['id']}").json() == card


# ------------------------------------------------------------------------------------------------------------
# Without a model


IMAGE = ModelDefaults(kind="image", height=32, width=32, num_inference_steps=2, guidance_scale=1.0)


def test_different_lora_sets_are_never_batched_together() -> None:
    def item(name: str, lora: LoraSet) -> WorkItem:
        req = GenerationRequest(prompt=name, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                                max_sequence_length=32, lora=lora)
        return WorkItem(id=name, kind="image", request=req, output=OutputSpec("png"))

    s = Scheduler(max_queue=10, max_batch_size=8, batch_wait_s=0)
    style, other = LoraSet.parse("style:0.8"), LoraSet.parse(["style:0.8", "late"])
    for it in (item("a", style), item("b", other), item("c", LoraSet.parse({"style": 0.8})), item("d", LoraSet())):
        s.submit(it)
    assert [it.id for it in s.next_batch(0)] == ["a", "c"]  # equal sets, however they were written
    assert [it.id for it in s.next_batch(0)] == ["b"]
    assert [it.id for it in s.next_batch(0)] == ["d"]


def test_supervisor_loads_between_batches_and_replays(tmp_path: Path) -> None:
    """`load_lora` goes to the worker as LoadLora; a loaded one updates the listing and is replayed by the next
    worker (`worker_config`), a failed one is a 400 and is not."""
    from diffserve.server.messages import ItemError

    class FakeWorker:
        """Both pipes of a worker that answers LoadLora at once (loading only files named good*)."""

        def __init__(self) -> None:
            self.asked: list[LoadLora] = []

        def send(self, msg: LoadLora) -> None:
            self.asked.append(msg)

        def poll(self, timeout: float) -> bool:
            return True

        def recv(self) -> LoraLoaded:
            msg = self.asked[-1]
            if Path(msg.spec.path).name.startswith("good"):
                info = {"name": msg.spec.name, "scale": 1.0, "default": False}
                return LoraLoaded(msg.request_id, info=info, loras=[info])
            return LoraLoaded(msg.request_id, error=ItemError(400, "not a LoRA file", type="invalid_request_error"))

    sup = WorkerSupervisor(WorkerConfig("stub", lora_mode="unmerged"), Scheduler(max_queue=1, max_batch_size=1))
    sup.info = Ready(defaults=IMAGE, pipeline_class="Stub", device="cpu", dtype="float32", pid=0,
                     lora_mode="unmerged")
    sup.state = "ready"
    worker = FakeWorker()
    sup._tasks = sup._events = worker  # type: ignore[assignment]
    good, bad = sup.load_lora(LoraSpec("/l/good.safetensors")), sup.load_lora(LoraSpec("/l/bad.safetensors"))
    assert not good.done() and sup._load_loras()  # run by the serving loop between batches
    assert good.result()["name"] == "good" and sup.lora_state() == (["good"], LoraSet())
    with pytest.raises(APIError) as e:
        bad.result()
    assert e.value.status == 400 and e.value.param == "path"
    assert [m.spec.name for m in worker.asked] == ["good", "bad"]
    assert sup.worker_config().replay_loras == (LoraSpec("/l/good.safetensors"),)


def test_merged_server_refuses_other_sets_and_loads(tmp_path: Path) -> None:
    http, rt, items = stub_app(tmp_path, IMAGE)
    merged = [{"name": "style", "path": "/x/style", "scale": 0.7, "default": True}]
    rt.supervisor.info = Ready(defaults=IMAGE, pipeline_class="Stub", device="cpu", dtype="float32", pid=0,
                               loras=merged, lora_mode="merged")
    body = {"prompt": "x", "size": "32x32"}
    for lora in ("style:0.5", [], "other"):
        err = assert_error(http.post("/v1/images/generations", json={**body, "lora": lora}), 400, param="lora")
        assert "--lora-mode unmerged" in err["message"] or "loaded: style" in err["message"]
    for lora in (None, "style:0.7", [{"name": "style", "scale": 0.7}]):
        assert http.post("/v1/images/generations", json={**body, "lora": lora}).status_code == 200
    assert all(it.request.lora == LoraSet.parse("style:0.7") for it in items)  # left out: the merged set
    err = assert_error(http.post("/v1/loras", json={"path": "a.safetensors"}), 400, code="lora_mode_merged")
    assert "--lora-mode unmerged" in err["message"]
    rt.supervisor.info.lora_mode = "unmerged"
    assert_error(http.post("/v1/loras", json={"path": "a.safetensors"}), 400, code="no_lora_dir")
    assert http.get("/v1/loras").json()["data"][0]["name"] == "style"
    form = ImageEditBody.parse({"prompt": "x", "lora": "style:0.5, late"}, lax=True)  # a multipart field
    assert form.lora_value() == ["style:0.5", "late"]
    assert ImageEditBody.parse({"prompt": "x", "lora": ""}).lora_value() == []  # "": no LoRA
    assert "several comma-separated" in http.get("/docs").text  # the field is documented on /docs


def test_multipart_lora_as_the_sdk_sends_it(tmp_path: Path) -> None:
    """images.edit is multipart: lora as strings ("lora[]" fields, or one comma-separated field); a list of
    objects, which the SDK flattens into lora[][name] / lora[][scale] fields grouped by key, is a 400."""
    edit_model = ModelDefaults(kind="image", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                               accepts_image=True)
    http, rt, items = stub_app(tmp_path, edit_model)
    loaded = [{"name": n, "path": f"/x/{n}", "scale": 1.0, "default": False} for n in ("style", "late")]
    rt.supervisor.info = Ready(defaults=edit_model, pipeline_class="Stub", device="cpu", dtype="float32", pid=0,
                               loras=loaded, lora_mode="unmerged")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    image = ("a.png", buf.getvalue(), "image/png")
    for lora, expected in ((["style:0.5", "late"], {"style": 0.5, "late": 1.0}),
                           ("style:0.25,late", {"style": 0.25, "late": 1.0}), ("", {})):
        client.images.edit(image=image, prompt="x", size="32x32", extra_body={"lora": lora})
        assert items[-1].request.lora == LoraSet.parse(expected), lora
    with pytest.raises(openai.BadRequestError, match="as strings"):  # lora[][name]=...: ambiguous in a form
        client.images.edit(image=image, prompt="x", extra_body={"lora": [{"name": "style", "scale": 0.5}]})
    r = http.post("/v1/images/edits", data={"prompt": "x", "lora": "style", "lora[]": "late"},
                  files={"image": image})
    assert_error(r, 400, param="lora")


def test_metadata_is_written_unless_switched_off() -> None:
    """The worker's batch runner encodes PNGs and MP4s with the result's metadata (and the LoRA set), and
    without it under --no-metadata."""
    import multiprocessing as mp

    from diffserve.engine.engine import GenerationResult
    from diffserve.server.messages import BatchTask, TaskItem
    from diffserve.server.worker import BatchRunner, CancelWatch

    req = GenerationRequest(prompt="p", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, seed=3,
                            num_frames=5, fps=8, lora=LoraSet.parse("style:0.5"))
    frames = np.zeros((5, 16, 16, 3), dtype=np.uint8)

    class Fake:
        def generate_batch(self, requests, **_):
            video = GenerationResult(request=req, videos=[frames], model="m", lora="style:0.5")
            image = GenerationResult(request=req.replace(num_frames=None, fps=None), model="m", lora="style:0.5",
                                     images=[Image.new("RGB", (16, 16))])
            return [video, image]

    class Events(list):
        send = list.append

    recv, _ = mp.Pipe(duplex=False)
    for on in (True, False):
        events = Events()
        BatchRunner(Fake(), events, CancelWatch(recv), False, metadata=on).run(BatchTask(1, [
            TaskItem("v", req, OutputSpec("mp4")), TaskItem("i", req, OutputSpec("png"))]))
        mp4, png = (e.blobs[0] for e in events if hasattr(e, "blobs"))
        text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"diffserve-meta-{os.getpid()}.mp4"
        tmp.write_bytes(mp4)
        tags = read_metadata(tmp)
        tmp.unlink()
        if on:
            assert text["lora"] == "style:0.5" and text["seed"] == "3" and text["model"] == "m"
            assert tags["prompt"] == "p" and tags["frames"] == "5" and tags["lora"] == "style:0.5"
        else:
            assert text == {} and "prompt" not in tags


def test_busy_port_is_one_line_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffserve.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == (f"diffserve: error: port {port} on 127.0.0.1 is already in use (another "
                                     "diffserve serve?); stop that server or choose another --port")
