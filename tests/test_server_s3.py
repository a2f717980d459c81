"""Outputs in S3 (`--output-storage s3://bucket/prefix`) against a local moto server: the store's write,
locate, remove, quota, sweep (paginated listing) and re-index after a restart, the start-up checks (bad URLs,
a missing bucket, refused credentials, no boto3), and the official openai client end to end: a ``url``
image through the real app over a stub worker (no model), and a video's download_content from a real server
on the embedded video model; both are redirected (307) to presigned URLs.

One moto server (in this process, 127.0.0.1, free port) and one diffserve server serve the module; each test
has its own bucket."""

from __future__ import annotations

import io
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import av
import boto3
import httpx
import openai
import pytest
from moto.server import ThreadedMotoServer

from diffserve.config import ModelDefaults
from diffserve.errors import UserError
from diffserve.server.storage_s3 import S3OutputStore, parse_s3_url
from diffserve.server.testing import ServerProcess, free_port, start_server, stub_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Videos API deprecated

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
VIDEO = "video_" + "ab" * 12 + ".mp4"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Test credentials only: no profile, config file or instance metadata of the machine is read."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    none = tmp_path_factory.getbasetemp() / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(none))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(none))
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"outputs-{uuid.uuid4().hex[:12]}"
    _client(endpoint).create_bucket(Bucket=name)
    return name


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def _store(endpoint: str, url: str, **kw) -> S3OutputStore:
    store = S3OutputStore(parse_s3_url(url), endpoint_url=endpoint, ttl_s=kw.pop("ttl_s", 60),
                          quota_bytes=kw.pop("quota_bytes", 10_000), **kw)
    store.check()
    store.open()
    return store


def _keys(endpoint: str, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in _client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_urls_are_parsed_or_refused_in_one_line() -> None:
    assert parse_s3_url("s3://outs").url == "s3://outs/"
    assert parse_s3_url("s3://outs/a//b/").prefix == "a/b/"
    for bad, says in (("s3://", "names no bucket"), ("s3:///prefix", "names no bucket"),
                      ("gs://outs/p", "is not accepted"), ("outs/p", "is not accepted"),
                      ("s3://o/p", "is not a bucket name"), ("s3://bad bucket/p", "is not a bucket name")):
        with pytest.raises(UserError, match=says) as e:
            parse_s3_url(bad)
        assert "\n" not in str(e.value)


def test_write_locate_and_remove(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, f"s3://{bucket}/run/1")
    image = store.image_name("webp")
    store.write("images", image, b"RIFF-image")
    store.write("videos", VIDEO, b"mp4-bytes")
    assert _keys(endpoint, bucket) == [f"run/1/images/{image}", f"run/1/videos/{VIDEO}"]
    assert store.total_bytes == 19 and len(store) == 2
    url = store.locate("images", image)
    assert isinstance(url, str) and url.startswith(f"{endpoint}/{bucket}/run/1/images/{image}?")
    assert "X-Amz-Expires=60" in url  # no longer than the job TTL (60 s here; 15 minutes at most)
    got = httpx.get(url)
    assert got.status_code == 200 and got.content == b"RIFF-image" and got.headers["content-type"] == "image/webp"
    video = httpx.get(store.locate("videos", VIDEO, filename="v.mp4"))
    assert video.content == b"mp4-bytes" and video.headers["content-type"] == "video/mp4"
    assert store.locate("images", "img_" + "0" * 32 + ".png") is None  # never written
    assert store.locate("images", "../secret") is None
    store.remove("videos", VIDEO)
    assert store.locate("videos", VIDEO) is None and _keys(endpoint, bucket) == [f"run/1/images/{image}"]
    assert store.total_bytes == 10


def test_quota_then_reindex_after_restart(endpoint: str, bucket: str) -> None:
    evicted: list[tuple[str, str]] = []
    store = _store(endpoint, f"s3://{bucket}/p", quota_bytes=2500, on_evict=lambda k, n: evicted.append((k, n)))
    names = [store.image_name("png") for _ in range(3)]
    for name in names:
        store.write("images", name, b"x" * 1000)
        time.sleep(0.01)
    store.write("videos", VIDEO, b"v" * 1000)
    assert evicted == [("images", names[0]), ("images", names[1])] and store.total_bytes == 2000
    assert _keys(endpoint, bucket) == sorted([f"p/images/{names[2]}", f"p/videos/{VIDEO}"])
    client = _client(endpoint)  # not outputs: left alone by the index, the quota and the sweep
    client.put_object(Bucket=bucket, Key="p/images/notes.txt", Body=b"n")
    client.put_object(Bucket=bucket, Key=f"other/images/{names[0]}", Body=b"o")
    again = _store(endpoint, f"s3://{bucket}/p", quota_bytes=2500)  # a restart: listed again
    assert len(again) == 2 and again.total_bytes == 2000
    assert again.locate("videos", VIDEO) is not None and again.locate("images", names[0]) is None
    assert httpx.get(again.locate("images", names[2])).content == b"x" * 1000
    again.remove("images", names[2])
    assert again.total_bytes == 1000


def test_sweep_lists_page_by_page_and_takes_strays(endpoint: str, bucket: str) -> None:
    store = S3OutputStore(parse_s3_url(f"s3://{bucket}/s"), endpoint_url=endpoint, ttl_s=30, quota_bytes=10**6,
                          list_page_size=2, list_every_s=0)
    store.open()
    names = [store.image_name("png") for _ in range(4)]
    for name in names:
        store.write("images", name, b"i")
    stray = "img_" + "f" * 32 + ".jpg"  # e.g. a delete that failed earlier: stored, not indexed
    _client(endpoint).put_object(Bucket=bucket, Key=f"s/images/{stray}", Body=b"s")
    _client(endpoint).put_object(Bucket=bucket, Key="s/keep.txt", Body=b"k")
    pages: list[int] = []
    store._client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: pages.append(1))
    assert store.sweep(time.time() + 10) == 0 and len(store) == 4
    assert len(pages) == 3  # 6 objects, 2 a page
    assert store.sweep(time.time() + 31) == 5
    assert len(store) == 0 and store.total_bytes == 0 and _keys(endpoint, bucket) == ["s/keep.txt"]
    store.list_every_s = 600  # the default: a listing at most every 10 minutes, the index between
    store.write("images", names[0], b"again")
    pages.clear()
    assert store.sweep(time.time() + 31) == 1 and pages == [] and _keys(endpoint, bucket) == ["s/keep.txt"]


def test_start_up_checks_name_the_problem(endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import moto.settings

    from diffserve.server.cli import _check_storage_args

    def check(url: str, where: str = endpoint) -> str:
        with pytest.raises(UserError) as e:
            S3OutputStore(parse_s3_url(url), endpoint_url=where, ttl_s=60, quota_bytes=1, attempts=1).check()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "bucket 'no-such-bucket' does not exist" in check("s3://no-such-bucket/p")
    closed = httpx.URL(endpoint).copy_with(port=free_port())  # nothing listens there
    assert "cannot reach the storage" in check(f"s3://{bucket}", str(closed))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no AWS credentials found" in check(f"s3://{bucket}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now
    assert "access refused (403" in check(f"s3://{bucket}")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))

    class Args:
        output_storage: str | None = f"s3://{bucket}"
        s3_endpoint_url: str | None = endpoint

    _check_storage_args(Args())  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if boto3 were not installed
    with pytest.raises(UserError, match=r"needs boto3, which is not installed: pip install 'diffserve\[s3\]'"):
        _check_storage_args(Args())  # type: ignore[arg-type]
    Args.output_storage = None
    with pytest.raises(UserError, match="--s3-endpoint-url is only used with --output-storage"):
        _check_storage_args(Args())  # type: ignore[arg-type]


def test_serve_refuses_a_missing_bucket_before_starting(endpoint: str, tmp_path: Path) -> None:
    """`diffserve serve` checks the bucket before it starts anything (main() prints the UserError, exit 2)."""
    from diffserve.cli import build_parser
    from diffserve.server.cli import cmd_serve

    args = build_parser().parse_args(["serve", "--model-path", "embedded:image", "--device", "cpu", "--output-dir",
                                      str(tmp_path), "--port", str(free_port()), "--output-storage", "s3://no-such-bucket/x",
                                      "--s3-endpoint-url", endpoint])
    with pytest.raises(UserError) as e:
        cmd_serve(args)
    assert str(e.value) == f"--output-storage s3://no-such-bucket/x/ at {endpoint}: bucket 'no-such-bucket' does not exist"


def test_url_images_redirect_to_s3_and_a_failed_write_is_a_500(endpoint: str, bucket: str, tmp_path: Path) -> None:
    """The real app and routes over a stub worker (no model): the openai client's url image, its redirect."""
    http, rt, _ = stub_app(tmp_path, ModelDefaults(kind="image", height=64, width=64, num_inference_steps=2,
                                                   guidance_scale=0.0),
                           output_storage=f"s3://{bucket}/stub", s3_endpoint_url=endpoint)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    res = client.images.generate(prompt="a red circle", n=2, response_format="url")
    names = [d.url.rsplit("/", 1)[1] for d in res.data]
    assert all(d.url == f"http://testserver/outputs/images/{n}" for d, n in zip(res.data, names))
    assert _keys(endpoint, bucket) == sorted(f"stub/images/{n}" for n in names)
    hop = http.get(f"/outputs/images/{names[0]}", follow_redirects=False)
    assert hop.status_code == 307 and hop.headers["cache-control"] == "no-store"
    assert hop.headers["location"].startswith(f"{endpoint}/{bucket}/stub/images/{names[0]}?")
    got = httpx.get(hop.headers["location"])  # the client fetches from the storage, without the API key
    assert got.content == b"img" and got.headers["content-type"] == "image/png"
    assert http.get("/outputs/images/img_" + "0" * 32 + ".png").status_code == 404
    assert not (tmp_path / "images").exists()  # nothing on local disk but the job database
    s3 = _client(endpoint)
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in _keys(endpoint, bucket)]})
    s3.delete_bucket(Bucket=bucket)  # every write fails from now
    failed = http.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "output_write_failed"
    assert "NoSuchBucket" in failed.json()["error"]["message"]
    assert rt.outputs.total_bytes == 2 * len(b"img")


@pytest.fixture(scope="module", autouse=True)
def video_server(endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """The embedded video model with its MP4s in a bucket (the one real server of this module), started
    before the first test so that it loads while the others run; the test using it waits until it is ready."""
    bucket = f"served-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)  # (module set-up: before aws_env)
    env = {**AWS_ENV, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    server = start_server("embedded:video", tmp_path_factory.mktemp("s3-video"), api_key="k", env=env, wait=False,
                          args=("--device", "cpu", "--log-level", "warning", "--s3-endpoint-url", endpoint,
                                "--output-storage", f"s3://{bucket}/video"))
    try:
        yield server, bucket
        ready = _ready(server)
    finally:
        code = server.stop()
    assert code == 0 or not ready, server.log()[-3000:]  # (a run of other tests may stop it while it loads)


def _ready(server: ServerProcess) -> bool:
    try:
        return server.health()[0] == 200
    except httpx.HTTPError:
        return False


def test_served_video_content_comes_from_s3(video_server: tuple[ServerProcess, str], endpoint: str) -> None:
    server, bucket = video_server
    server.wait_ready()
    sent: list[httpx.Request] = []  # the SDK's own client settings (it follows redirects), watched
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60, http_client=http)
    job = client.videos.create(prompt="a blue square", size="32x32",  # type: ignore[arg-type]
                               extra_body={"num_frames": 5, "num_inference_steps": 2})
    deadline = time.monotonic() + 60
    while (job := client.videos.retrieve(job.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.status == "completed", job.error
    key = f"video/videos/{job.id}.mp4"
    assert _keys(endpoint, bucket) == [key]
    hop = httpx.get(f"{server.url}/v1/videos/{job.id}/content", headers=server.headers)
    assert hop.status_code == 307 and hop.headers["location"].startswith(f"{endpoint}/{bucket}/{key}?")
    sent.clear()
    mp4 = client.videos.download_content(job.id).content  # follows the 307
    assert [r.url.host for r in sent] == ["127.0.0.1", "127.0.0.1"] and sent[1].url.port != server.port
    assert sent[0].headers["authorization"] == "Bearer k" and "authorization" not in sent[1].headers  # not to S3
    with av.open(io.BytesIO(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert (server.output_dir / "jobs.sqlite3").is_file() and not (server.output_dir / "videos").exists()
    assert client.videos.delete(job.id).deleted
    assert _keys(endpoint, bucket) == []
