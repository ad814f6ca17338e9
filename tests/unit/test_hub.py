"""Hub ids: a model and a dataset resolved at revisions from a Hugging Face cache laid out as
huggingface_hub writes it (the real library, HF_HUB_OFFLINE=1), missing ids and revisions
refused up front, one fetch per node, and resume refusing another base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from smolvla_ray import hub
from smolvla_ray.checkpoint.base import check_resume_base
from smolvla_ray.prepare import check_hub_ids, pin_hub_revisions
from smolvla_ray.spec import spec_from_dict
from tests.hub import FakeHub, blob_id, commit_of, iter_lines, read_tree, write_cached_repo

REPO = Path(__file__).resolve().parents[2]
MAIN, V2 = commit_of("model main"), commit_of("model v2")
DATA_MAIN, DATA_V1 = commit_of("data main"), commit_of("data v1")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home; a Hub endpoint where nothing listens (no network)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv(hub.FETCH_LOG_ENV, str(tmp_path / "fetches.log"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def offline(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the library read it at import
    return hf_cache


def tiny_pretrained(directory: Path, seed: int) -> dict[str, bytes]:
    """The files of a tiny LeRobot pretrained_model/ (random weights from `seed`)."""
    from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy

    config = PolicyConfig.preset("tiny").with_features(
        state_dim=6, action_dim=6, cameras={"top": (3, 96, 128)}
    )
    torch.manual_seed(seed)
    SmolVLAPolicy(config).save_pretrained(str(directory))
    return read_tree(directory)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("models")
    return {"main": tiny_pretrained(root / "a", 0), "v2": tiny_pretrained(root / "b", 1)}


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    from smolvla_ray.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("datasets")
    write_demo_dataset(str(root / "a"), num_episodes=2, episode_length=8, cameras=("top",))
    write_demo_dataset(str(root / "b"), num_episodes=3, episode_length=8, cameras=("top",))
    return {"main": read_tree(root / "a"), "v1": read_tree(root / "b")}


def lay_out(cache: Path, model_files: dict, dataset_files: dict) -> None:
    write_cached_repo(cache, "me/tiny", model_files["main"], commit=MAIN)
    write_cached_repo(cache, "me/tiny", model_files["v2"], commit=V2, refs=("v2",))
    write_cached_repo(
        cache, "me/demo", dataset_files["main"], commit=DATA_MAIN, repo_type="dataset"
    )
    write_cached_repo(
        cache, "me/demo", dataset_files["v1"], commit=DATA_V1, repo_type="dataset", refs=("v1",)
    )


def spec_for(storage: Path, **policy) -> object:
    return spec_from_dict(
        {
            "name": "hub",
            "policy": {"pretrained": "me/tiny", **policy},
            "data": {"uri": "me/demo", "revision": "v1"},
            "train": {"steps": 1, "batch_size": 2},
            "checkpoint": {"storage": str(storage)},
        }
    )


def test_the_laid_out_cache_is_what_huggingface_hub_reads(
    offline: Path, model_files: dict, dataset_files: dict
) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    lay_out(offline, model_files, dataset_files)
    for repo, repo_type, revision, commit in [
        ("me/tiny", "model", "main", MAIN),
        ("me/tiny", "model", "v2", V2),
        ("me/tiny", "model", V2, V2),
        ("me/demo", "dataset", "v1", DATA_V1),
    ]:
        folder = snapshot_download(
            repo, repo_type=repo_type, revision=revision, cache_dir=offline, local_files_only=True
        )
        assert Path(folder) == offline / f"{repo_type}s--me--{repo[3:]}" / "snapshots" / commit
    config = hf_hub_download("me/tiny", "config.json", revision="v2", cache_dir=offline)
    assert Path(config).read_bytes() == model_files["v2"]["config.json"]
    info = hf_hub_download(
        "me/demo", "meta/info.json", repo_type="dataset", revision="v1", cache_dir=offline
    )
    assert Path(info).read_bytes() == dataset_files["v1"]["meta/info.json"]


def test_offline_model_and_dataset_resolve_at_their_revisions(
    offline: Path, tmp_path: Path, model_files: dict, dataset_files: dict
) -> None:
    from safetensors.torch import load_file

    from smolvla_ray.build import open_dataset
    from smolvla_ray.data.meta import load_meta
    from smolvla_ray.policy import SmolVLAPolicy
    from smolvla_ray.settings import RunSettings

    lay_out(offline, model_files, dataset_files)
    for revision, files in [(None, "main"), ("v2", "v2"), (MAIN, "main")]:
        policy = SmolVLAPolicy.from_pretrained("me/tiny", revision=revision)
        expected = load_file(
            str(hub.model_snapshot("me/tiny", revision=files) / "model.safetensors")
        )
        for name, tensor in policy.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], msg=name)
    assert hub.model_snapshot("me/tiny", revision="v2").name == V2
    assert (
        hub.model_file("me/tiny", "config.json").read_bytes() == model_files["main"]["config.json"]
    )

    url = hub.dataset_url("me/demo", "v1")
    assert url == str(offline / "datasets--me--demo" / "snapshots" / DATA_V1)
    meta = load_meta(url)
    assert meta.storage.is_local and len(meta.episodes) == 3  # v1 has 3 episodes, main 2
    assert len(load_meta(hub.dataset_url("hf://datasets/me/demo")).episodes) == 2

    spec = spec_for(tmp_path / "runs", revision="v2")
    check_hub_ids(spec)
    pinned = pin_hub_revisions(spec)
    assert (pinned.policy.revision, pinned.data.revision) == (V2, DATA_V1)
    assert len(open_dataset(RunSettings.from_spec(pinned), storage_options={}).episodes) == 3
    assert list(iter_lines(tmp_path / "fetches.log")) == []  # nothing was downloaded


def test_missing_ids_and_revisions_are_refused_before_anything_starts(
    offline: Path, tmp_path: Path, model_files: dict, dataset_files: dict
) -> None:
    from smolvla_ray.cli import app

    lay_out(offline, model_files, dataset_files)
    storage = tmp_path / "runs"
    cases = [
        (
            spec_for(storage, pretrained="me/nope"),
            r"policy.pretrained='me/nope' at policy."
            r"revision='main' is not in the Hugging Face cache .*huggingface-cli download me/nope",
        ),
        (spec_for(storage, revision="v9"), r"policy.revision='v9' is not in the Hugging Face"),
        (spec_for(storage, revision="f" * 40), r"policy.revision='f{40}' is not in"),
    ]
    for spec, message in cases:
        with pytest.raises(hub.HubIdError, match=message):
            check_hub_ids(spec)
    no_data = spec_for(storage).model_copy(
        update={"data": spec_for(storage).data.model_copy(update={"revision": "v7"})}
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"data.uri='me/demo' at data.revision='v7'.*"
        r"--repo-type dataset",
    ):
        check_hub_ids(no_data)
    preset = spec_from_dict(
        {**spec_for(storage).public_dict(), "policy": {"preset": "tiny", "revision": "v2"}}
    )
    with pytest.raises(ValueError, match="policy.revision='v2' needs a hub id"):
        check_hub_ids(preset)

    # Through the command line: exit 2, nothing started, the message names the fix.
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_for(storage, revision="v9").public_dict()))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "policy.revision='v9'" in result.output and not storage.exists()


FETCH = """
import sys
from smolvla_ray import hub
print(hub.model_snapshot("me/tiny", revision=sys.argv[1]))
"""


def test_two_processes_and_a_restart_fetch_the_model_once(
    hf_cache: Path, tmp_path: Path, model_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub() as server:
        server.add("me/tiny", model_files["main"], commit=MAIN)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        # Two processes of one node at once (the workers), each from an empty cache...
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", FETCH, "main"], cwd=REPO, stdout=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        paths = {w.communicate(timeout=120)[0].strip() for w in workers}
        assert all(w.returncode == 0 for w in workers)
        # ...then a restart, which finds the snapshot in the cache.
        assert paths == {str(hub.model_snapshot("me/tiny", revision=MAIN))}
    assert set(server.downloads.values()) == {1}  # every file's body was served once
    blobs = {blob_id(name, content) for name, content in model_files["main"].items()}
    assert len(server.downloads) == len(blobs)  # equal files share a blob, fetched once
    (line,) = iter_lines(tmp_path / "fetches.log")
    assert line.startswith(f"model me/tiny {MAIN} snapshot ")
    assert (hf_cache / "models--me--tiny" / "refs" / "main").read_text() == MAIN


def test_online_uncached_dataset_is_read_through_the_hub_at_its_commit(
    hf_cache: Path, dataset_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub() as server:
        server.add(
            "me/demo", dataset_files["v1"], commit=DATA_V1, repo_type="dataset", refs=("v1",)
        )
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert hub.dataset_url("me/demo", "v1") == f"hf://datasets/me/demo@{DATA_V1}"
        with pytest.raises(ValueError, match="give the revision in one place"):
            hub.dataset_url("hf://datasets/me/demo@v1", "main")
        with pytest.raises(hub.HubIdError, match="no such dataset repo"):
            hub.dataset_url("me/other")
    assert not server.downloads  # nothing was copied; the reader streams what it needs


def test_resume_refuses_another_base_commit_or_fingerprint() -> None:
    recorded = {"uri": "me/tiny", "revision": MAIN, "commit": MAIN, "frozen_sha256": "a" * 64}
    check_resume_base(recorded, dict(recorded), checkpoint_uri="ckpt")
    with pytest.raises(
        ValueError,
        match=rf"me/tiny@{MAIN} \(commit {MAIN}\) but this run's "
        rf"base is me/tiny@{V2} \(commit {V2}\).*policy.revision: {MAIN}",
    ):
        check_resume_base(recorded, {**recorded, "commit": V2}, checkpoint_uri="ckpt")
    with pytest.raises(ValueError, match=f"fingerprint {'a' * 64} but .* has {'b' * 64}"):
        check_resume_base(recorded, {**recorded, "frozen_sha256": "b" * 64}, checkpoint_uri="ckpt")
    # A checkpoint from before commits were recorded is checked by its fingerprint alone.
    legacy = {"uri": "preset:tiny", "frozen_sha256": "a" * 64}
    check_resume_base(
        legacy, {**recorded, "uri": "preset:tiny", "commit": None}, checkpoint_uri="ckpt"
    )


def test_hub_ids_are_told_from_paths_and_urls(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "dir").mkdir(parents=True)
    assert hub.is_hub_id("lerobot/smolvla_base") and hub.is_hub_id("me/demo.v2")
    for value in ["local/dir", "./a/b", "/a/b", "s3://a/b", "a/b/c", "a", None]:
        assert not hub.is_hub_id(value), value
    assert hub.dataset_repo("hf://datasets/me/demo@v1") == ("me/demo", "v1")
    assert hub.dataset_repo("hf://datasets/me/demo/") == ("me/demo", None)
    assert hub.dataset_repo("s3://b/me/demo") is None


def test_a_cached_dataset_snapshot_is_keyed_by_repo_and_commit_not_by_path() -> None:
    from smolvla_ray.hub import canonical_dataset_url

    commit = "0123456789abcdef0123456789abcdef01234567"
    for home in ("/root/.cache/huggingface/hub", "/mnt/nodeB/hf/hub"):
        url = f"{home}/datasets--lerobot--svla_so101_pickplace/snapshots/{commit}"
        assert canonical_dataset_url(url) == f"hf://datasets/lerobot/svla_so101_pickplace@{commit}"
    assert canonical_dataset_url("s3://bucket/datasets/libero") == "s3://bucket/datasets/libero"
