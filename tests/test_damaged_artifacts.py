"""Damaged artifacts: every file's size and SHA-256 is in the manifest; loading checks sizes,
`check` checks digests; both name the damaged file and say to re-export."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from tiny_artifacts import plain_batch1

from nemocompile.artifact.files import ArtifactDamagedError
from nemocompile.cli import main
from nemocompile.artifact.manifest import Manifest
from nemocompile.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def art(tmp_path):
    _, src = plain_batch1()
    copy = tmp_path / "art"
    shutil.copytree(src, copy)
    return copy


def test_manifest_records_every_file_with_size_and_sha256(art):
    m = Manifest.load(art)
    on_disk = {f.name for f in art.iterdir() if f.is_file() and f.name != "manifest.json"}
    assert set(m.files) == on_disk and m.weights_file in m.files and {g.file for g in m.graphs} <= on_disk
    for name, rec in m.files.items():
        data = (art / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
@pytest.mark.parametrize("which", ["weights.bin", "verify.onnx"])
def test_runtime_and_cli_name_the_damaged_file(art, capsys, damage, which):
    path = art / which
    if damage == "missing":
        path.unlink()
    else:
        _truncate(path, 0 if damage == "empty" else None)
    with pytest.raises(ArtifactDamagedError, match=rf"{which}: .*the artifact is damaged; re-export it"):
        Runtime.load(art)
    for argv in (["run", "--artifact", str(art), "--mode", "linear-spec", "--prompt", "x"],
                 ["bench", "--artifact", str(art), "--limit", "1", "--quiet"],
                 ["serve", "--stdio", "--artifact", str(art)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and which in err and "re-export" in err, err
    assert main(["check", "--artifact", str(art)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {path}" in out and "every graph would parse" not in out
    assert out.rstrip().endswith("the artifact is damaged: re-export it")


def test_check_verifies_digests_of_same_size_damage(art, capsys):
    path = art / "weights.bin"
    data = bytearray(path.read_bytes())
    data[100:104] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(data))
    with Runtime.load(art):  # sizes match: loading stays cheap and does not read every byte
        pass
    assert main(["check", "--artifact", str(art), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["damaged_files"] == [f"{path}: SHA-256 differs from the manifest's "
                                                            "(the file was altered)"]


def test_a_manifest_without_records_still_fails_in_one_line(art, capsys):
    """Artifacts exported before the records existed: a truncated graph is one line, not a protobuf traceback."""
    raw = json.loads((art / "manifest.json").read_text())
    del raw["files"]
    (art / "manifest.json").write_text(json.dumps(raw))
    _truncate(art / "verify.onnx")
    assert main(["run", "--artifact", str(art), "--mode", "linear-spec", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "verify.onnx" in err and "re-export" in err, err
    assert main(["check", "--artifact", str(art)]) == 1
    out = capsys.readouterr().out
    assert "verify.onnx: cannot be read" in out and "every graph would parse" not in out


def test_a_manifest_with_invalid_bytes_is_one_line(art, capsys):
    (art / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    assert main(["check", "--artifact", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not UTF-8" in err and err.count("\n") == 1
