"""`LocalHub` + `hub_env` against the real `huggingface_hub` and `transformers` clients, loopback only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from hub_server import GITATTRIBUTES, LocalHub, hub_env
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    constants,
    create_commit,
    create_repo,
    delete_folder,
    hf_hub_download,
    list_repo_refs,
    model_info,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "secret-token"
BINARY = bytes(range(256)) * 5 + b"\x00\xff\r\n"


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub(token=TOKEN) as hub, hub_env(hub):
        yield hub


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_upload_folder_then_download_exact_bytes(hub: LocalHub, tmp_path: Path) -> None:
    files = {"config.json": b'{"a": 1}\n', "weights.bin": BINARY, "sub dir/notes #1.txt": b"spaces & hash\n"}
    url = create_repo("user/files")
    assert url.repo_id == "user/files" and url.endpoint == hub.endpoint
    info = upload_folder(folder_path=make_folder(tmp_path / "src", files), repo_id="user/files")
    for name, data in files.items():
        path = hf_hub_download("user/files", name)
        assert read(path) == data
        assert f"snapshots/{info.oid}/" in Path(path).as_posix()
    siblings = {s.rfilename: s.size for s in model_info("user/files", files_metadata=True).siblings or []}
    assert siblings == {".gitattributes": len(GITATTRIBUTES), **{name: len(data) for name, data in files.items()}}
    assert create_repo("user/files", exist_ok=True).repo_id == "user/files"
    with pytest.raises(HfHubHTTPError) as error:
        create_repo("user/files")
    assert error.value.response.status_code == 409


def test_revisions_by_sha_and_branch(hub: LocalHub) -> None:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert api.create_repo("history").repo_id == "user/history"  # bare name -> the hub's user
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id="user/history")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id="user/history")
    assert first.oid != second.oid and len(first.oid) == 40
    assert read(hf_hub_download("user/history", "f.txt", revision=first.oid)) == b"v1"
    assert read(hf_hub_download("user/history", "f.txt", revision="main")) == b"v2"
    assert read(hf_hub_download("user/history", "f.txt", revision=second.oid)) == b"v2"
    assert api.model_info("user/history", revision=first.oid).sha == first.oid
    assert [b.target_commit for b in list_repo_refs("user/history").branches] == [second.oid]

    commits = hub.commits("user/history")
    assert [c.oid for c in commits[1:]] == [first.oid, second.oid]
    assert [dict(c.files).get("f.txt") for c in commits] == [None, b"v1", b"v2"]
    assert commits[2].message == "Upload f.txt with huggingface_hub"

    unchanged = api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id="user/history")
    assert unchanged.oid == second.oid and len(hub.commits("user/history")) == 3  # no empty commit
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/history", "f.txt", revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as error:
        add = CommitOperationAdd(path_in_repo="g.txt", path_or_fileobj=b"g")
        create_commit("user/history", [add], commit_message="stale", parent_commit=first.oid)
    assert error.value.response.status_code == 412
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id="user/history", create_pr=True)
    assert error.value.response.status_code == 400

    with pytest.raises(RevisionNotFoundError):
        model_info("user/history", revision="refs/pr/1")  # encoded as one path segment
    branch = "feature/x #1"  # needs URL-encoding
    api.create_branch("user/history", branch=branch, revision=first.oid)
    on_branch = api.upload_file(path_or_fileobj=b"b", path_in_repo="f.txt", repo_id="user/history", revision=branch)
    assert read(hf_hub_download("user/history", "f.txt", revision=branch)) == b"b"
    assert model_info("user/history", revision=branch).sha == on_branch.oid
    refs = {b.name: b.target_commit for b in list_repo_refs("user/history").branches}
    assert refs == {"main": second.oid, branch: on_branch.oid}
    api.create_branch("user/history", branch=branch, exist_ok=True)

    api.delete_file("f.txt", repo_id="user/history")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/history", "f.txt")
    assert read(hf_hub_download("user/history", "f.txt", revision=first.oid)) == b"v1"
    with pytest.raises(EntryNotFoundError):
        api.delete_file("f.txt", repo_id="user/history")


def test_snapshot_download_gets_all_files(hub: LocalHub, tmp_path: Path) -> None:
    files = {"a.txt": b"a", "deep/er/b.bin": BINARY, "deep/c.json": b"{}"}
    create_repo("user/snap")
    first = upload_folder(folder_path=make_folder(tmp_path / "src", files), repo_id="user/snap")
    upload_file(path_or_fileobj=b"new", path_in_repo="a.txt", repo_id="user/snap")

    def tree(folder: str) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}

    assert tree(snapshot_download("user/snap")) == dict(hub.commits("user/snap")[-1].files)
    assert tree(snapshot_download("user/snap", revision=first.oid)) == {".gitattributes": GITATTRIBUTES, **files}
    partial = snapshot_download("user/snap", allow_patterns="deep/*", local_dir=tmp_path / "partial")
    assert {k: v for k, v in tree(partial).items() if not k.startswith(".cache/")} == {
        k: v for k, v in files.items() if k.startswith("deep/")
    }
    assert sorted(e.path for e in HfApi().list_repo_tree("user/snap", path_in_repo="deep")) == [
        "deep/c.json",
        "deep/er",
    ]
    delete_folder("deep", repo_id="user/snap")
    assert sorted(HfApi().list_repo_files("user/snap")) == [".gitattributes", "a.txt"]


def test_dataset_repo(hub: LocalHub) -> None:
    create_repo("user/data", repo_type="dataset")
    upload_file(path_or_fileobj=b"x,y\n", path_in_repo="d.csv", repo_id="user/data", repo_type="dataset")
    assert read(hf_hub_download("user/data", "d.csv", repo_type="dataset")) == b"x,y\n"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/data", "d.csv")  # not a model repo


def test_missing_repo_and_missing_file(hub: LocalHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/nope")
    create_repo("user/present")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/present", "missing.txt")


def test_wrong_token_is_refused(hub: LocalHub) -> None:
    create_repo("user/guarded")
    for token in ("wrong", False):
        with pytest.raises(HfHubHTTPError) as error:
            upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/guarded", token=token)
        assert error.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as error:
        create_repo("user/other", token="wrong")
    assert error.value.response.status_code == 401
    assert len(hub.commits("user/guarded")) == 1
    assert read(hf_hub_download("user/guarded", ".gitattributes", token=False))  # reads need no token


def test_transformers_push_to_hub_and_from_pretrained(hub: LocalHub) -> None:
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    model = BertModel(config).eval()
    model.push_to_hub("user/tiny-bert")
    loaded = AutoModel.from_pretrained("user/tiny-bert").eval()
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)
    assert "README.md" in hub.commits("user/tiny-bert")[-1].files


def test_model_card_round_trip(hub: LocalHub) -> None:
    create_repo("user/carded")
    card = ModelCard("---\nlicense: mit\ntags:\n- linearized\n---\n\n# Carded\n\nHello.\n")
    card.push_to_hub("user/carded")
    loaded = ModelCard.load("user/carded")
    assert loaded.content == card.content
    assert loaded.data.license == "mit" and loaded.data.tags == ["linearized"]


def test_hub_env_restores_everything() -> None:
    endpoint, cache, environ = constants.ENDPOINT, constants.HF_HUB_CACHE, dict(os.environ)
    with LocalHub() as hub:
        with hub_env(hub):
            assert constants.ENDPOINT == os.environ["HF_ENDPOINT"] == hub.endpoint
            assert Path(constants.HF_HUB_CACHE).is_relative_to(hub.home)
            assert "HF_TOKEN" not in os.environ
        home, stopped = hub.home, hub.endpoint
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, dict(os.environ)) == (endpoint, cache, environ)
    assert not home.exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = hub.endpoint

    with hub_env(endpoint=stopped, token="t"):  # an unreachable Hub, with a cache of its own
        assert os.environ["HF_TOKEN"] == "t" and not Path(constants.HF_HOME).is_relative_to(home)
        with pytest.raises(httpx2.ConnectError):
            create_repo("user/gone")
    assert endpoint == constants.ENDPOINT
    with pytest.raises(TypeError, match="exactly one"), hub_env():
        pass
