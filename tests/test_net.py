"""Bounded waits, no leaks, CounterFact from the Hub copy (issues 21, 16): loopback servers, small deadlines."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from laser_export.benchmarks import BenchmarkError, load_examples
from laser_export.cli import main

try:
    from tests.hub_server import HubServer
except ImportError:  # pragma: no cover
    from hub_server import HubServer

COUNTERFACT = Path(__file__).parent / "fixtures" / "counterfact_small.json"


@pytest.fixture
def stalled_endpoint():
    """Accepts connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def hub_env(monkeypatch, tmp_path, hub_online):
    """huggingface_hub pointed at a per-test cache; returns a function that sets its endpoint."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", "2")

    def point(endpoint: str) -> None:
        monkeypatch.setattr(hc, "ENDPOINT", endpoint)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    return point


class _Serve:
    """A loopback HTTP server whose GET handler is ``handler(request_handler)``."""

    def __init__(self, handler):
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                handler(self)

            do_POST = do_PUT = do_GET

            def log_message(self, *a):
                pass

        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        outer.requests = []

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf"])
def test_bad_hub_timeout_env_is_exit_2_naming_the_variable(value, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", value)
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "--repo-id", "org/x"]) == 2
    assert "LASER_EXPORT_HUB_TIMEOUT" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing.yaml")]) == 2  # every command, before anything else
    assert "LASER_EXPORT_HUB_TIMEOUT" in capsys.readouterr().err


def test_stalled_hub_source_gives_up_at_the_deadline(hub_env, stalled_endpoint):
    """Before: huggingface_hub's own per-request timeouts and 5 retries ran ~400 s, then 'file does not exist'."""
    from laser_export.sources import SourceError, resolve_source

    hub_env(stalled_endpoint)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"no complete answer within the 2 s deadline.*LASER_EXPORT_HUB_TIMEOUT"):
        resolve_source("org/never").load_config()
    assert time.monotonic() - t0 < 8


def test_download_stalling_mid_file_gives_up_at_the_deadline(hub_env, tmp_path, tiny_folder):
    """The server answers the metadata, then the weights' body stalls after its headers (weights load and
    apply's snapshot_download)."""
    from laser_export.sources import SourceError, resolve_source
    from laser_export.stream import StreamError, checkpoint_folder

    with HubServer(tmp_path / "hub") as hub:
        _seed(hub, "org/tiny", tiny_folder)
        hub.stall_files = {"model.safetensors"}
        hub_env(hub.endpoint)
        src = resolve_source("org/tiny")
        src.load_config()  # small files come through
        t0 = time.monotonic()
        with pytest.raises(StreamError, match="2 s deadline"):
            checkpoint_folder(src)
        assert time.monotonic() - t0 < 8
        t0 = time.monotonic()
        from laser_export.architectures import family_for

        with pytest.raises(SourceError, match="2 s deadline"):
            src.load_model(family_for("llama"))
        assert time.monotonic() - t0 < 8


def test_a_progressing_download_is_not_cut_by_the_deadline(hub_env, tmp_path, tiny_folder, monkeypatch):
    """Credit for bytes moved: a transfer that keeps flowing outlives a deadline shorter than it."""
    from laser_export import net
    from laser_export.sources import resolve_source
    from laser_export.stream import checkpoint_folder

    with HubServer(tmp_path / "hub") as hub:
        _seed(hub, "org/tiny", tiny_folder)
        hub_env(hub.endpoint)
        monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", "0.5")
        monkeypatch.setattr(net, "MIN_RATE", 1)  # every byte buys a second
        folder = checkpoint_folder(resolve_source("org/tiny"))
        assert (folder / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------- CounterFact


def _trickle(req):
    req.send_response(200)
    req.send_header("Content-Length", "1000")
    req.end_headers()
    for _ in range(1000):
        try:
            req.wfile.write(b" ")
            req.wfile.flush()
        except OSError:
            return
        time.sleep(0.5)


def _truncated(req):
    body = COUNTERFACT.read_bytes()
    req.send_response(200)
    req.send_header("Content-Length", str(len(body) + 500))
    req.send_header("Connection", "close")
    req.end_headers()
    req.wfile.write(body)
    req.wfile.flush()
    req.close_connection = True


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_counterfact_url_that_trickles_ends_at_the_deadline(home, monkeypatch):
    """Before: a per-read timeout only; one byte every 0.5 s never ended."""
    monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", "2")
    server = _Serve(_trickle)
    try:
        t0 = time.monotonic()
        with pytest.raises(BenchmarkError, match=r"could not download .*2 s deadline"):
            load_examples("counterfact", server.url + "/counterfact.json")
        assert time.monotonic() - t0 < 6
    finally:
        server.close()
    assert not [p for p in home.rglob("*") if p.is_file()]  # nothing committed, no temporary left


def test_counterfact_truncated_download_is_never_committed(home):
    server = _Serve(_truncated)
    try:
        with pytest.raises(BenchmarkError, match="could not download"):
            load_examples("counterfact", server.url + "/counterfact.json")
    finally:
        server.close()
    assert not [p for p in home.rglob("*") if p.is_file()]


def _hub_copy(folder: Path, records: list[dict]) -> None:
    """A local copy of azhx/counterfact in its own layout (data/{train,test}-*.parquet, the record schema)."""
    from datasets import Dataset

    (folder / "data").mkdir(parents=True)
    train, test = records[:4], records[4:]
    Dataset.from_list(list(reversed(train))).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(test).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))


def test_counterfact_from_a_copy_of_the_hub_dataset_equals_the_json(tmp_path):
    records = json.loads(COUNTERFACT.read_text())
    _hub_copy(tmp_path / "cf", records)
    from laser_export.benchmarks.hub import recorded_sources

    with recorded_sources() as sources:
        examples = load_examples("counterfact", str(tmp_path / "cf"))
    assert examples == load_examples("counterfact", str(COUNTERFACT))  # case_id order restored
    assert [s["split"] for s in sources] == ["train", "test"] and all(s["repo"] == "azhx/counterfact" for s in sources)


def test_counterfact_default_is_the_pinned_hub_copy(home, monkeypatch):
    from laser_export.benchmarks import counterfact, hub

    calls = []

    def fake(name, repo, config, split, path, revision=None):
        calls.append((repo, split, path, revision))
        recs = json.loads(COUNTERFACT.read_text())
        return recs[:4] if split == "train" else recs[4:]

    monkeypatch.setattr(hub, "load_rows", fake)
    assert len(load_examples("counterfact")) == 18
    assert calls == [("azhx/counterfact", "train", None, counterfact.HUB_REVISION),
                     ("azhx/counterfact", "test", None, counterfact.HUB_REVISION)]
    assert len(counterfact.HUB_REVISION) == 40


# ------------------------------------------------------------------------------------- leaks


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text("---\nlicense: mit\n---\nhi\n")
    return folder


@pytest.mark.parametrize("kind", ["file", "folder", "fifo"])
def test_push_refuses_symlinks_and_non_regular_files(kind, export_folder, tmp_path, hub_online):
    from laser_export.export.hub import PushError, push_folder

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY")
    if kind == "file":
        (export_folder / "notes.txt").symlink_to(secret / "id_rsa")
    elif kind == "folder":
        (export_folder / "extra").symlink_to(secret)
    else:
        os.mkfifo(export_folder / "pipe")
    with HubServer(tmp_path / "hub") as hub:
        with pytest.raises(PushError, match="refusing to push") as err:
            push_folder(export_folder, "org/x", endpoint=hub.endpoint, token=False)
        assert "symbolic link" in str(err.value) or "not a regular file" in str(err.value)
        assert not any(m == "POST" and "/commit/" in p for m, p in hub.requests)  # nothing sent


def _echo_credentials(req):
    """A Hub that fails and echoes every credential it was sent, in plain text."""
    auth = req.headers.get("Authorization", "")
    body = json.dumps({"error": f"denied for {auth.split(' ', 1)[-1]} via {req.path} ({req.headers.get('Host')})"}).encode()
    req.send_response(400)  # not retried by huggingface_hub: the test stays fast
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def test_token_from_the_token_file_is_never_echoed(export_folder, tmp_path, monkeypatch, capsys, hub_online):
    """Before: only hf_-shaped tokens and HF_TOKEN were redacted; a token read from the token file leaked."""
    import huggingface_hub.constants as hc

    token_file = tmp_path / "token"
    token_file.write_text("mycompanysso-9f8e7d6c5b")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = _Serve(_echo_credentials)
    try:
        assert main(["push", str(export_folder), "--repo-id", "org/x", "--endpoint", server.url, "--hub-timeout", "5"]) == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "push failed" in err and "denied for" in err
    assert "mycompanysso" not in err


def test_endpoint_password_is_never_printed(export_folder, monkeypatch, capsys, hub_online):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = _Serve(_echo_credentials)
    try:
        endpoint = server.url.replace("http://", "http://alice:pa55-w0rd-xyz@")
        assert main(["push", str(export_folder), "--repo-id", "org/x", "--endpoint", endpoint, "--hub-timeout", "5"]) == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "Retry with: laser-export push" in err and "alice:***@" in err
    assert "pa55-w0rd-xyz" not in err


# ------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _repo_class():
    try:
        from tests.hub_server import Repo
    except ImportError:  # pragma: no cover
        from hub_server import Repo
    return Repo


def _seed(hub: HubServer, repo_id: str, folder: Path) -> None:
    """Put ``folder``'s files in ``repo_id`` on the test Hub (one commit)."""
    Repo = type(next(iter(hub.repos.values()))) if hub.repos else _repo_class()

    repo = Repo(repo_id=repo_id, private=False)
    hub.repos[repo_id] = repo
    hub.new_commit(repo, "seed", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def test_a_xet_backed_file_credits_the_deadline_for_its_size(hub_online):
    """Xet downloads run outside httpx: the requests after one must not be refused for the time it took."""
    from laser_export import net

    def xet_head(req):
        req.send_response(200)
        req.send_header("X-Xet-Hash", "ab" * 32)
        req.send_header("X-Linked-Size", str(100 * net.MIN_RATE))
        req.send_header("Content-Length", "0")
        req.end_headers()

    server = _Serve(xet_head)
    try:
        with net.deadline(0.5):
            net.session().get(server.url + "/a")
            time.sleep(0.8)  # "the Xet download"
            assert net.session().get(server.url + "/b").status_code == 200
        with net.deadline(0.5), pytest.raises(Exception, match="deadline"):  # without the header: refused
            time.sleep(0.8)
            net.session().get(server.url + "/c")
    finally:
        server.close()


def test_xet_is_off_inside_a_deadline_unless_asked_for(monkeypatch):
    """issue 21: hf_xet's transfers bypass httpx, so a deadline could not bound them; inside a deadline
    huggingface_hub's HF_HUB_DISABLE_XET is on, so every byte goes over httpx (bounded). HF_HUB_DISABLE_XET=0
    asks for Xet explicitly (then unbounded). Outside the block the setting is what it was."""
    import importlib.util

    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    from laser_export import net

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with net.deadline(5):
        assert constants.HF_HUB_DISABLE_XET and not is_xet_available()
    assert constants.HF_HUB_DISABLE_XET is False
    with net.deadline(None):  # no deadline: huggingface_hub's own default
        assert constants.HF_HUB_DISABLE_XET is False
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    assert net.xet_in_use() == (importlib.util.find_spec("hf_xet") is not None)
    with net.deadline(5):
        assert constants.HF_HUB_DISABLE_XET is (not net.xet_in_use())
