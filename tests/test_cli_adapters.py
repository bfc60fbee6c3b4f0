"""`mintd adapters ...` on a data dir: import a real PEFT folder, browse, promote, export, collect."""

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mintd.catalog import Catalog, CatalogDB
from mintd.cli import app
from mintd.config import CatalogSettings, EngineSettings
from mintd.engine.adapters import LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.model import fingerprint
from mintd.store.blobs import BlobStore
from mintd.store.peft import WEIGHTS_FILE, save_peft_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def peft_dir(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT folder of a tiny-model adapter with non-zero B."""
    engine = Engine(qwen3_dir, EngineSettings(device="cpu"))
    spec = LoraSpec(rank=4, alpha=8, seed=1)
    slot = engine.create_adapter(spec)
    gen = torch.Generator().manual_seed(1)
    for _, b in engine.slots[slot].weights.values():
        b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    spec, tensors = engine.export_adapter(slot)
    out = tmp_path_factory.mktemp("peft")
    save_peft_folder(out, spec, tensors, "tiny-qwen3")
    return out


def cli(*args: str, data_dir: Path, code: int = 0) -> str:
    result = runner.invoke(app, ["adapters", *args, "--data-dir", str(data_dir)])
    assert result.exit_code == code, result.output
    return result.output


def test_help_for_every_command() -> None:
    for cmd in (
        "list",
        "show",
        "log",
        "lineage",
        "eval add",
        "promote",
        "rollback",
        "import",
        "export",
        "interpolate",
        "gc",
    ):
        result = runner.invoke(app, ["adapters", *cmd.split(), "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_import_browse_promote_export_gc(peft_dir: Path, qwen3_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = cli("import", str(peft_dir), "--name", "math", "--base-model-dir", str(qwen3_dir), data_dir=data)
    assert "imported local/math@1" in out
    out = cli("import", str(peft_dir), "--name", "math", "--base-model-dir", str(qwen3_dir), data_dir=data)
    assert "local/math@2" in out

    cat = Catalog(CatalogDB.from_settings(CatalogSettings(), data))
    rev = cat.resolve("local", "math@1")
    assert rev.kind == "external"
    assert rev.provenance.base_fingerprint == fingerprint(qwen3_dir)
    assert rev.provenance.lora_config["rank"] == 4
    assert cat.resolve("local", "math@2").content_hash == rev.content_hash  # same bytes, one blob

    assert "math" in cli("list", data_dir=data)
    assert "math" in cli("list", "--prefix", "ma", data_dir=data)
    assert "math" not in cli("list", "--prefix", "zz", data_dir=data)
    out = cli("show", "math", data_dir=data)
    assert "local/math@2" in out and "local/math@1" in out
    out = cli("log", "math", data_dir=data)
    assert out.index("local/math@2") < out.index("local/math@1")
    assert "local/math@1" in cli("lineage", "math@1", data_dir=data)

    # gate refused, then met
    out = cli("promote", "math", "prod", "1", "--gate", "gsm8k:acc>=0.5", data_dir=data, code=1)
    assert "gate" in out and "Traceback" not in out
    cli("eval", "add", "math@1", "--suite", "gsm8k", "--metric", "acc", "--value", "0.7", data_dir=data)
    assert "math:prod -> @1" in cli("promote", "math", "prod", "1", "--gate", "gsm8k:acc>=0.5", data_dir=data)
    assert "math:prod -> @2" in cli("promote", "math", "prod", "@2", data_dir=data)
    assert "prod" in cli("show", "math", data_dir=data)
    assert "math:prod -> @1" in cli("rollback", "math", "prod", data_dir=data)
    assert cat.resolve("local", "math:prod").number == 1
    out = cli("rollback", "math", "prod", data_dir=data, code=1)
    assert "no earlier target" in out

    # export round trip: same tensors as imported
    exported = tmp_path / "exported"
    cli("export", "math:prod", str(exported), data_dir=data)
    a, b = load_file(str(peft_dir / WEIGHTS_FILE)), load_file(str(exported / WEIGHTS_FILE))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].to(torch.float32), b[k].to(torch.float32)), k
    assert (exported / "adapter_config.json").is_file()

    # gc: an unreferenced blob goes, the referenced one stays
    blobs = BlobStore(data / "blobs")
    stray = blobs.put(b"nobody references this")
    old = time.time() - 7200
    os.utime(blobs.path(stray), (old, old))
    out = cli("gc", "--dry-run", data_dir=data)
    assert "would delete 1 blob" in out and stray in out
    assert blobs.exists(stray)
    out = cli("gc", data_dir=data)
    assert "deleted 1 blob" in out
    assert not blobs.exists(stray)
    assert blobs.exists(rev.content_hash)


def test_errors_are_one_red_line(peft_dir: Path, qwen3_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    out = cli("import", str(bad), "--name", "x", "--base-model-dir", str(qwen3_dir), data_dir=data, code=1)
    assert "error:" in out and "not supported" in out and "Traceback" not in out
    out = cli("import", str(tmp_path / "missing"), "--name", "x", "--base-model-dir", str(qwen3_dir),
              data_dir=data, code=1)  # fmt: skip
    assert "no such adapter folder" in out
    out = cli(
        "import", str(peft_dir), "--name", "x", "--base-model-dir", str(tmp_path), data_dir=data, code=1
    )
    assert "not a Hugging Face model folder" in out
    assert "not found" in cli("show", "nope", data_dir=data, code=1)
    assert "does not exist" in cli("list", data_dir=tmp_path / "elsewhere", code=1)
    assert "suite:metric>=threshold" in cli("promote", "a", "b", "1", "--gate", "x", data_dir=data, code=1)


def test_interpolate_writes_an_exact_or_compressed_soup(
    peft_dir: Path, qwen3_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    cli("import", str(peft_dir), "--name", "math", "--base-model-dir", str(qwen3_dir), data_dir=data)
    out = cli(
        "interpolate", "math@1", "math@1", "--coef", "0.5", "--coef", "1.5", "--name", "soup", data_dir=data
    )
    assert "interpolated local/soup@1  (rank 8)" in out
    out = cli("interpolate", "math@1", "--coef", "2", "--name", "soup", "--rank", "2", data_dir=data)
    assert "local/soup@2  (rank 2, truncation error" in out
    cat = Catalog(CatalogDB.from_settings(CatalogSettings(), data))
    assert [r.ref for r in cat.lineage("local", "soup@1")] == ["local/math@1"]
    cli("export", "soup@1", str(tmp_path / "soup"), data_dir=data)
    exact, source = load_file(str(tmp_path / "soup" / WEIGHTS_FILE)), load_file(str(peft_dir / WEIGHTS_FILE))
    for key, a in source.items():
        if ".lora_A." in key:
            b = source[key.replace(".lora_A.", ".lora_B.")]
            ea, eb = exact[key], exact[key.replace(".lora_A.", ".lora_B.")]
            # source alpha 8 / rank 4; soup alpha 32 / rank 8: 2·(8/4)·B·A == (32/8)·B'·A'
            assert torch.allclose(4.0 * eb @ ea, 2.0 * 2.0 * b @ a, atol=1e-6), key
    out = cli("interpolate", "math@1", "--coef", "1", "--coef", "2", "--name", "soup", data_dir=data, code=1)
    assert "coefficients: 2 given for 1 source_paths" in out and "Traceback" not in out
