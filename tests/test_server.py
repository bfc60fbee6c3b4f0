"""Server assembly rules that protect users from an open, unauthenticated server."""

import pytest

from mintd.config import ServeSettings
from mintd.server import build_app, is_loopback, parse_keys


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "example.com"])
def test_no_api_key_refuses_to_bind_beyond_loopback(qwen3_dir, tmp_path, host):
    with pytest.raises(ValueError, match="needs at least one --api-key"):
        build_app({"tiny": qwen3_dir}, ServeSettings(host=host, data_dir=tmp_path))


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "host"))


def test_api_keys_map_to_owners():
    keys = parse_keys(["alice=tml-a", "tml-bbbbbbbbbb"])
    assert keys == {"tml-a": "alice", "tml-bbbbbbbbbb": "key-tml-bbbb"}
    with pytest.raises(ValueError, match="--api-key"):
        parse_keys(["alice="])


def test_serve_flags_are_checked_before_anything_starts(qwen3_dir, tmp_path):
    from typer.testing import CliRunner

    from mintd.cli import app

    base = ["serve", "--model", f"tiny={qwen3_dir}", "--data-dir", str(tmp_path)]
    cases = {
        ("--blob-cache-budget", "lots"): "--blob-cache-budget",
        ("--blob-url", "gs://bucket/x"): "blob_url: 'gs://bucket/x' must be a local folder or s3://",
        ("--replica-id", "no spaces"): "--replica-id",
        ("--catalog-url", "sqlite://"): "catalog_url: SQLite needs a file path",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.replace("│", " ").split()), result.output


def test_blob_url_folder_and_catalog_url_are_used(qwen3_dir, tmp_path):
    from mintd.config import BlobSettings, CatalogSettings

    catalog = CatalogSettings(catalog_url=f"sqlite:///{tmp_path / 'shared' / 'cat.db'}")
    blobs = BlobSettings(blob_url=str(tmp_path / "bytes"))
    settings = ServeSettings(data_dir=tmp_path / "d")
    _, service = build_app({"tiny": qwen3_dir}, settings, catalog_settings=catalog, blob_settings=blobs)
    service.close()
    assert (tmp_path / "shared" / "cat.db").is_file() and (tmp_path / "bytes").is_dir()
    assert not (tmp_path / "d" / "blobs").exists()
