"""Selecting a backend from the store URL setting (`open_store`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from prompt_store.local import LocalStore
from prompt_store.s3 import S3Store
from prompt_store.url import open_store


def test_plain_paths_open_a_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path / "a"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "a"
    store = open_store(tmp_path / "b")  # os.PathLike
    assert isinstance(store, LocalStore) and store.root == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    store = open_store("rel/dir:with-colon")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "rel" / "dir:with-colon"


def test_file_urls_open_a_local_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/c?keep_versions=7&lock_timeout=2.5")
    assert isinstance(store, LocalStore)
    assert (store.root, store.keep_versions, store.lock_timeout) == (tmp_path / "c", 7, 2.5)
    assert open_store(store.url).root == store.root  # .url round-trips
    space = open_store(f"file://localhost{tmp_path}/with%20space")
    assert isinstance(space, LocalStore) and space.root == tmp_path / "with space"
    assert open_store(f"file://{tmp_path}/d", keep_versions=3).keep_versions == 3


def test_s3_urls_open_an_s3_store() -> None:
    store = open_store(
        "s3://my-bucket/some/prefix/?endpoint_url=http://127.0.0.1:9&region=eu-west-1&keep_versions=4"
        "&read_timeout=1.5&max_attempts=2",
        access_key_id="k",
        secret_access_key="s",
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.keep_versions) == ("my-bucket", "some/prefix", 4)
    assert store.endpoint_url == "http://127.0.0.1:9"
    assert store.url == "s3://my-bucket/some/prefix"
    bare = open_store(
        "s3://my-bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1", keep_versions=2
    )
    assert isinstance(bare, S3Store) and bare.prefix == "" and bare.keep_versions == 2
    # keyword options win over the query string
    assert open_store("s3://b/p?keep_versions=4", keep_versions=6, region="us-east-1").keep_versions == 6


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "ftp://host/x",
        "http://host/x",
        "file://otherhost/x",
        "s3://",
        "s3:///prefix-without-bucket",
        "s3://user:secret@bucket/p",
        "s3://b/p?secret_access_key=x",
        "s3://b/p?access_key_id=x",
        "s3://b/p?unknown=1",
        "s3://b/p?keep_versions=many",
        "file:///tmp/x?endpoint_url=http://a",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


def test_s3_from_standard_aws_environment(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, make_artifact: Callable[..., bytes]
) -> None:
    """No options at all: endpoint, region and credentials come from the AWS_* variables."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"vpt-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)  # also configured from the environment
    store = open_store(f"s3://{bucket}/env")
    data = make_artifact(1)
    assert store.put("acme", "cats", data).version == 1
    assert store.get("acme", "cats")[0] == data
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="env/tenants/acme/tasks/cats/")
    assert {o["Key"].rsplit("/", 1)[1] for o in listing["Contents"]} == {
        "manifest.json",
        "v000001.safetensors",
    }
    store.close()
