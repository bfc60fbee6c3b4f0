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
