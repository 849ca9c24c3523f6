"""push_folder against a local Hub-compatible server, then from_pretrained back through it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from laser_export.export.hub import PushError, folder_operations, hub_repo_url, push_folder, retry_command

try:  # tests/ may or may not be a package
    from tests.hub_server import HubServer, LfsObject, git_blob_sha1
except ImportError:  # pragma: no cover
    from hub_server import HubServer, LfsObject, git_blob_sha1


REPO_ID = "laser-tests/tiny-llama-laser"
README = textwrap.dedent(
    """\
    ---
    license: apache-2.0
    library_name: transformers
    tags:
    - laser
    ---
    # tiny llama
    """
)


@pytest.fixture
def hub_server(tmp_path, hub_online):
    """A running test Hub on 127.0.0.1: yields the HubServer (`.endpoint`, `.storage`, `.requests`)."""
    with HubServer(tmp_path / "hub-storage") as server:
        yield server


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A saved tiny random Llama + manifest.json + README.md, and the logits of the in-memory model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("export") / "tiny-llama-laser"
    model.save_pretrained(folder)
    manifest = {"laser_export_version": "0.1.0", "storage": "dense", "matrices": [], "totals": {"bytes_saved": 0, "n_matrices": 0}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "README.md").write_text(README)
    input_ids = torch.tensor([[1, 5, 17, 99, 3, 42, 7, 64]])
    with torch.no_grad():
        logits = model(input_ids).logits
    return folder, input_ids, logits


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_retry_command_and_url():
    assert retry_command("out/x", "me/m") == "laser-export push out/x --repo-id me/m"
    assert retry_command("out dir/x", "me/m", private=True) == "laser-export push 'out dir/x' --repo-id me/m --private"
    assert retry_command("o", "me/m", endpoint="http://h:1") == "laser-export push o --repo-id me/m --endpoint http://h:1"
    assert hub_repo_url("me/m", endpoint="http://h:1/") == "http://h:1/me/m"


def test_folder_operations_skip_git_and_cache(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "x.lock").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    assert folder_operations(tmp_path) == ["config.json", "sub/a.json"]


def test_push_then_from_pretrained_roundtrip(hub_server, tiny_export, tmp_path):
    folder, input_ids, logits = tiny_export
    before = _snapshot(folder)

    url = push_folder(folder, REPO_ID, endpoint=hub_server.endpoint, token=False)

    # Returned URL is the commit URL of the one commit made on the server.
    repo = hub_server.repos[REPO_ID]
    assert len(repo.commits) == 2  # server's initial commit (.gitattributes) + exactly one push commit
    assert url == f"{hub_server.endpoint}/{REPO_ID}/commit/{repo.head.oid}"
    assert [r for r in hub_server.requests if r[0] == "POST" and "/commit/" in r[1]] == [
        ("POST", f"/api/models/{REPO_ID}/commit/main")
    ]
    assert ("POST", "/api/validate-yaml") in hub_server.requests  # README front matter was validated
    assert "LASER" in repo.head.summary

    # model.safetensors went through LFS (the Hub's rule for *.safetensors), the rest inline.
    assert isinstance(repo.head.files["model.safetensors"], LfsObject)
    assert isinstance(repo.head.files["config.json"], bytes)
    assert f"/{REPO_ID}.git/info/lfs/objects/batch" in [p for m, p in hub_server.requests]
    # Every local file is on the server, byte-identical; local folder untouched.
    expected = {"config.json", "generation_config.json", "model.safetensors", "manifest.json", "README.md"}
    assert expected <= set(before)
    assert set(repo.head.files) == set(before) | {".gitattributes"}
    for rel, digest in before.items():
        assert hashlib.sha256(hub_server.file_bytes(REPO_ID, rel)).hexdigest() == digest
        assert hashlib.sha256((hub_server.storage / REPO_ID / rel).read_bytes()).hexdigest() == digest
    assert _snapshot(folder) == before

    # model_info through huggingface_hub sees the same siblings and sha.
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub_server.endpoint, token=False).model_info(REPO_ID)
    assert info.sha == repo.head.oid
    assert {s.rfilename for s in info.siblings} == set(repo.head.files)

    # Pushing the same folder again is a no-op (no new commit) and still succeeds.
    url2 = push_folder(folder, REPO_ID, endpoint=hub_server.endpoint, token=False)
    assert len(repo.commits) == 2 and repo.head.oid in url2

    # Load back through the endpoint in a fresh interpreter (HF_ENDPOINT is read at import time).
    out = tmp_path / "logits.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from huggingface_hub import constants
        assert constants.ENDPOINT == {hub_server.endpoint!r}, constants.ENDPOINT
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({REPO_ID!r}).eval()
        with torch.no_grad():
            logits = model(torch.tensor({input_ids.tolist()!r})).logits
        torch.save(logits, {str(out)!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_server.endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = torch.load(out)
    assert loaded.shape == logits.shape == (1, 8, 128)
    assert (loaded - logits).abs().max().item() <= 1e-6
    # The download really went through the test server, into the temp cache.
    assert ("GET", f"/{REPO_ID}/resolve/{repo.head.oid}/model.safetensors") in hub_server.requests or (
        "GET", f"/{REPO_ID}/resolve/main/model.safetensors") in hub_server.requests
    cached = list((tmp_path / "hf_home").rglob("model.safetensors"))
    assert cached and hashlib.sha256(cached[0].read_bytes()).hexdigest() == before["model.safetensors"]


def test_push_failure_keeps_folder_and_names_retry(hub_server, tiny_export):
    folder, _, _ = tiny_export
    before = _snapshot(folder)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    hub_server.fail_commits = True

    with pytest.raises(PushError) as excinfo:
        push_folder(folder, REPO_ID, endpoint=hub_server.endpoint, token=False)

    err = excinfo.value
    msg = str(err)
    assert isinstance(err, RuntimeError)
    assert f"laser-export push {folder} --repo-id {REPO_ID}" in msg
    assert err.retry_command == f"laser-export push {folder} --repo-id {REPO_ID} --endpoint {hub_server.endpoint}"
    assert f"local export at {folder} is intact" in msg
    assert "500" in msg
    assert err.folder == str(folder) and err.repo_id == REPO_ID
    # Nothing changed locally, nothing committed remotely beyond the repo creation.
    assert _snapshot(folder) == before
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes
    assert len(hub_server.repos[REPO_ID].commits) == 1
    assert set(hub_server.repos[REPO_ID].head.files) == {".gitattributes"}


def test_push_failure_unreachable_endpoint_and_missing_folder(tmp_path, tiny_export):
    folder, _, _ = tiny_export
    before = _snapshot(folder)
    # A port nobody listens on: connection refused -> PushError, folder intact.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(PushError, match=r"Retry with: laser-export push \S+ --repo-id laser-tests/tiny-llama-laser --endpoint http://127"):
        push_folder(folder, REPO_ID, endpoint=f"http://127.0.0.1:{port}", token=False)
    assert _snapshot(folder) == before

    with pytest.raises(PushError, match="is not a directory"):
        push_folder(tmp_path / "nope", REPO_ID, endpoint=f"http://127.0.0.1:{port}", token=False)


def test_server_validate_yaml_rejects_broken_model_index(hub_server):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=False)
    api._validate_yaml("---\nlicense: mit\n---\nhi\n")  # accepted
    with pytest.raises(ValueError, match="Invalid metadata"):
        api._validate_yaml("---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n")


def test_push_private_with_commit_message(hub_server, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text(README)
    url = push_folder(folder, "me/private-one", private=True, endpoint=hub_server.endpoint, token=False,
                      commit_message="custom message")
    repo = hub_server.repos["me/private-one"]
    assert repo.private is True
    assert repo.head.summary == "custom message"
    assert url.endswith(f"/me/private-one/commit/{repo.head.oid}")
    assert repo.head.files["config.json"] == b'{"model_type": "llama"}'


# ---------------------------------------------------------------------------------------- LFS uploads


@pytest.mark.parametrize("transfer", ["basic", "multipart"])
def test_push_uploads_large_files_through_lfs(transfer, tmp_path, tiny_export, hub_online):
    """Files at or over the server's LFS threshold (and *.safetensors) go through the LFS batch API, streamed
    to the server's disk and checked by sha256 and size; the commit references them as lfsFile; the model
    downloads back byte-identical. (huggingface_hub 2.4 takes this path only with Xet disabled: with
    hf_xet installed it uploads every LFS file over Xet, which this server does not speak.)"""
    folder, input_ids, logits = tiny_export
    weights = (folder / "model.safetensors").stat().st_size
    kw = dict(lfs_threshold=4096)
    if transfer == "multipart":
        kw.update(multipart_threshold=4096, multipart_chunk=max(4096, weights // 3 + 1))
    with HubServer(tmp_path / "hub", **kw) as hub:
        push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=False)
        repo = hub.repos[REPO_ID]
        blob = repo.head.files["model.safetensors"]
        assert isinstance(blob, LfsObject) and blob.size == weights
        assert blob.oid == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert isinstance(repo.head.files["config.json"], bytes)  # small files stay regular (inline)
        paths = [p for m, p in hub.requests]
        assert f"/{REPO_ID}.git/info/lfs/objects/batch" in paths
        parts = [p for p in paths if "/part/" in p]
        if transfer == "multipart":
            assert len(parts) == -(-weights // hub.multipart_chunk) >= 2
            assert f"/lfs-complete/{blob.oid}" in paths
        else:
            assert not parts and f"/lfs-upload/{blob.oid}" in paths
        assert not list((hub.lfs_dir / "tmp").iterdir())  # nothing half-written left behind

        # pushing again sends nothing new (the object is already stored: no actions in the batch answer)
        n = len(hub.requests)
        push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=False)
        assert not [p for m, p in hub.requests[n:] if p.startswith("/lfs-")]

        # downloads stream the object back from disk, byte-identical (test_push_then_from_pretrained_roundtrip
        # loads an LFS-pushed model.safetensors with from_pretrained)
        from huggingface_hub import hf_hub_download

        got = hf_hub_download(REPO_ID, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "dl", token=False)
        assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == blob.oid


def test_lfs_upload_with_wrong_content_is_refused(tmp_path, hub_online):
    """The server stores an object only when the bytes match the announced sha256 and size."""
    import httpx2

    with HubServer(tmp_path / "hub", lfs_threshold=1) as hub:
        oid = hashlib.sha256(b"the real bytes").hexdigest()
        hub.lfs_pending[oid] = len(b"the real bytes")
        r = httpx2.put(f"{hub.endpoint}/lfs-upload/{oid}", content=b"other bytes!!!")
        assert r.status_code == 400 and not hub.lfs_object(oid).exists()
        r = httpx2.put(f"{hub.endpoint}/lfs-upload/{oid}", content=b"the real bytes")
        assert r.status_code == 200 and hub.lfs_object(oid).read_bytes() == b"the real bytes"


def test_push_with_xet_asked_for_names_the_setting(tmp_path, tiny_export, hub_online, monkeypatch):
    """By default a push (under its deadline) uploads large files through LFS over httpx, bounded, even with
    hf_xet installed. HF_HUB_DISABLE_XET=0 asks for Xet: a server without Xet fails the push, and the message
    says how to use LFS instead."""
    pytest.importorskip("hf_xet")
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", False)
    folder, _, _ = tiny_export
    with HubServer(tmp_path / "hub") as hub:
        push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=False)  # LFS, no Xet request
        assert not any("xet-write-token" in p for m, p in hub.requests)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
        with pytest.raises(PushError, match="set HF_HUB_DISABLE_XET=1"):
            push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=False)
        assert any("xet-write-token" in p for m, p in hub.requests)
