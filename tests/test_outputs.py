"""Outputs lose nothing and crash on nothing: `-o` replaces only a tcc artifact, in one step
that a kill at any instant cannot break (the old artifact or the new one is there, complete);
files are written through exclusive temporaries, never through a planted link; what a killed
run left beside its output is removed by the next save, and a concurrent one's is not; write
errors (read-only file system, not a directory, a name too long, a full disk) are one line with
exit code 2; and reading an artifact follows no link and allocates no more than its files hold.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import tcc
from tcc.cli import main
from tcc.runtime import artifact, outputs
from tcc.runtime.outputs import STAGING, remove_stale_staging, staging_dir
from test_bad_inputs import COMMANDS, _rehash, assert_one_line_error, expect_refused

TINY = str(Path(__file__).resolve().parent / "bad_inputs" / "tiny.pt2")
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every case runs in its own empty directory: whatever it wrote would show there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts of tiny.pt2 with different files: for the CPU and for fpga-small."""
    root = tmp_path_factory.mktemp("artifacts")
    return tcc.compile(TINY).save(root / "cpu"), tcc.compile(TINY, target="fpga-small").save(root / "fpga")


def tree(root: Path) -> dict[str, bytes]:
    """Everything under `root` by relative path: files with their bytes, folders as None."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def staging(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(STAGING))


# ---------------------------------------------------------------------------------------------
# -o replaces only a tcc artifact

def _foreign_manifest(dest: Path) -> None:
    dest.mkdir()
    (dest / "manifest.json").write_text('{"name": "my-web-app", "version": 2}')
    (dest / "index.html").write_text("<p>mine</p>")


def _old_version(dest: Path, artifacts) -> None:
    shutil.copytree(artifacts[0], dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps(dict(manifest, version=1)))


DESTINATIONS = [
    ("foreign-manifest", lambda d, a: _foreign_manifest(d),
     "manifest.json: 'format' is None, not 'tcc-artifact'); refusing to overwrite it"),
    ("older-format-version", _old_version, "artifact format version 1; this tcc reads version 3"),
    ("folder-without-manifest", lambda d, a: (d.mkdir(), (d / "notes.txt").write_text("mine")),
     "a directory without manifest.json; refusing to overwrite it"),
    ("file", lambda d, a: d.write_text("mine"), "out: not a directory; refusing to overwrite it"),
    ("link-to-an-artifact", lambda d, a: d.symlink_to(a[0], target_is_directory=True),
     "out: a symbolic link; refusing to overwrite it"),
    ("link-to-a-file", lambda d, a: d.symlink_to(a[0] / "graph.tcc"), "out: a symbolic link; refusing"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in DESTINATIONS], ids=[c[0] for c in DESTINATIONS])
def test_compile_refuses_to_replace_what_is_not_a_tcc_artifact(artifacts, make, message, tmp_path, capfd):
    make(tmp_path / "out", artifacts)
    expect_refused(["compile", TINY, "-o", str(tmp_path / "out")], message, tmp_path, capfd)
    with pytest.raises(tcc.TccError, match="refusing to overwrite it"):  # the API's save too
        tcc.compile(TINY).save(tmp_path / "out")


@pytest.mark.parametrize("dest", [".", "..", "{cwd}", "{cwd}/../art"])
def test_the_current_directory_and_those_above_it_are_never_replaced(artifacts, dest, tmp_path, monkeypatch, capfd):
    """Even when they hold a tcc artifact."""
    shutil.copytree(artifacts[0], tmp_path / "art")
    shutil.copy(artifacts[0] / "manifest.json", tmp_path)  # the parent looks like an artifact too
    monkeypatch.chdir(tmp_path / "art")
    expect_refused(["compile", TINY, "-o", dest.format(cwd=tmp_path / "art")],
                   "the current directory or one above it; refusing to overwrite it", tmp_path, capfd)


def test_an_artifact_is_replaced_and_nothing_is_left_beside_it(artifacts, tmp_path, capfd):
    shutil.copytree(artifacts[0], tmp_path / "out")
    assert main(["compile", TINY, "--target", "fpga-small", "-q", "-o", str(tmp_path / "out")]) == 0
    assert tree(tmp_path / "out") == tree(artifacts[1])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_an_exchange_two_renames_replace_the_artifact(artifacts, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is not available."""
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    shutil.copytree(artifacts[0], tmp_path / "out")
    tcc.load(artifacts[1]).save(tmp_path / "out")
    assert tree(tmp_path / "out") == tree(artifacts[1])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------
# a kill at any instant of a save

KILLING_SAVE = """
import os, signal, sys
import tcc
from tcc.runtime import artifact, outputs
module, name, nth, when, source, dest = sys.argv[1:]
module = {"artifact": artifact, "outputs": outputs}[module]
real, calls = getattr(module, name), []

def killing(*args, **kwargs):
    calls.append(name)
    if len(calls) == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if len(calls) == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(module, name, killing)
tcc.load(source).save(dest)
"""

KILL_POINTS = [  # (module, function, nth call, before or after it)
    ("artifact", "_write", 1, "before"),  # the first file of the staging directory
    ("artifact", "_write", 3, "after"),
    ("artifact", "publish", 1, "before"),  # every file written
    ("outputs", "_exchange", 1, "before"),
    ("outputs", "_exchange", 1, "after"),  # the old artifact at the staging name
]


@pytest.mark.parametrize("point", KILL_POINTS, ids=["-".join(map(str, p)) for p in KILL_POINTS])
def test_a_kill_during_a_save_leaves_the_old_artifact_or_the_new_one(artifacts, point, tmp_path):
    old, new = artifacts
    shutil.copytree(old, tmp_path / "out")
    killed = subprocess.run([sys.executable, "-c", KILLING_SAVE, *map(str, point), new, tmp_path / "out"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert tree(tmp_path / "out") in (tree(old), tree(new))
    tcc.load(tmp_path / "out")  # complete: every hash checks
    assert len(staging(tmp_path)) == 1  # what the kill left beside it ...
    tcc.load(old).save(tmp_path / "other")
    assert staging(tmp_path) == []  # ... removed by the next save beside it
    assert tree(tmp_path / "out") in (tree(old), tree(new))


def test_a_kill_during_a_first_save_leaves_no_output(artifacts, tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLING_SAVE, "artifact", "_write", "2", "after", artifacts[1],
                             tmp_path / "out"], capture_output=True, text=True, env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out").exists() and len(staging(tmp_path)) == 1
    tcc.load(artifacts[0]).save(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


HOLDING_STAGING = """
import sys, time
from pathlib import Path
from tcc.runtime.outputs import staging_dir
with staging_dir(Path(sys.argv[1])) as staging:
    (staging / "weights.safetensors").write_bytes(b"half")
    print(staging, flush=True)
    time.sleep(300)
"""


def test_a_concurrent_save_keeps_the_staging_of_a_writer_at_work(artifacts, tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", HOLDING_STAGING, tmp_path], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        theirs = Path(writer.stdout.readline().strip())
        tcc.load(artifacts[0]).save(tmp_path / "out")
        assert (theirs / "weights.safetensors").read_bytes() == b"half"
    finally:
        writer.kill()
        writer.wait()
    tcc.load(artifacts[0]).save(tmp_path / "out")  # its writer is gone: now it is stale
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staging_of_a_dead_pid_is_kept_while_locked(tmp_path):
    """A writer in another PID namespace: its PID means nothing here, its lock does."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    theirs = tmp_path / f"{STAGING}.{ended.pid}.x1y2"
    theirs.mkdir()
    fd = os.open(theirs, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        remove_stale_staging(tmp_path)
        assert theirs.is_dir()
    finally:
        os.close(fd)
    remove_stale_staging(tmp_path)
    assert not theirs.exists()
    with staging_dir(tmp_path) as ours:  # this process's own, while it works
        remove_stale_staging(tmp_path)
        assert ours.is_dir()
    assert not any(tmp_path.iterdir())


SIGTERM_DURING_SAVE = """
import os, runpy, signal, sys
from tcc.runtime import artifact
real, calls = artifact._write, []

def terminating(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

artifact._write = terminating
sys.argv = ["tcc", *sys.argv[1:]]
runpy.run_module("tcc", run_name="__main__")
"""


@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_during_a_save_cleans_up(artifacts, existing, tmp_path):
    """`python -m tcc compile`, sent SIGTERM while it writes the artifact's second file: exit
    code 143, `tcc: interrupted`, no staging; the artifact there before is as it was."""
    if existing:
        shutil.copytree(artifacts[0], tmp_path / "out")
    before = tree(tmp_path)
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_SAVE, "compile", TINY, "--target", "fpga-small",
                             "-q", "-o", tmp_path / "out"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines() == ["tcc: interrupted"]
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# write errors: one line, exit code 2, nothing half-written

def test_write_errors_are_one_line(artifacts, tmp_path, capfd):
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "dir").mkdir()
    long = "n" * 300
    cases = [
        (["compile", TINY, "-o", "file.txt/out"], "file.txt/out: cannot write (Not a directory)"),
        (["compile", TINY, "-o", long], f"{long}: cannot write (File name too long)"),
        (["run", str(artifacts[0]), "-o", "missing/y.pt"], "missing/y.pt: cannot write (No such file or directory)"),
        (["run", str(artifacts[0]), "-o", "dir"], "dir: cannot write (Is a directory)"),
        (["run", str(artifacts[0]), "-o", long], f"{long}: cannot write (File name too long)"),
        (["run", str(artifacts[1]), "--on", "sim", "--stats", "missing/s.json"],
         "missing/s.json: cannot write (No such file or directory)"),
        (["run", str(artifacts[1]), "--on", "sim", "--stats", "dir"], "dir: cannot write (Is a directory)"),
    ]
    for argv, message in cases:
        expect_refused(argv, message, tmp_path, capfd)


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, capfd):
    """On a real read-only mount (a private mount namespace), checked before the compile; where
    no namespace can be made (an unprivileged container), the file system's refusal is injected."""
    (tmp_path / "ro").mkdir()
    script = 'mount -t tmpfs -o ro none ro || exit 77; exec "$@"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "tcc", "compile",
                             TINY, "-o", "ro/out"], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    if result.returncode != 77 and "unshare" not in result.stderr:
        assert result.returncode == 2, result.stderr
        assert_one_line_error(result.stderr, "ro/out: cannot write (Read-only file system)")
        return

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    expect_refused(["compile", str(TINY), "-o", "ro/out"], "ro/out: cannot write (Read-only file system)", tmp_path,
                   capfd)


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(artifacts, existing, tmp_path, monkeypatch, capfd):
    """The disk fills up at the artifact's third file."""
    if existing:
        shutil.copytree(artifacts[0], tmp_path / "out")
    real, calls = artifact._write, []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    monkeypatch.setattr(artifact, "_write", write)
    expect_refused(["compile", TINY, "-o", "out"], "out: cannot write (No space left on device)", tmp_path, capfd)


def test_a_full_disk_during_run_keeps_the_old_output(artifacts, tmp_path, monkeypatch, capfd):
    (tmp_path / "y.pt").write_bytes(b"the previous outputs")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    expect_refused(["run", str(artifacts[0]), "-o", "y.pt"], "y.pt: cannot write (No space left on device)", tmp_path,
                   capfd)


def test_run_writes_through_no_planted_link(artifacts, tmp_path, capfd):
    """The temporary beside the output is exclusive and unpredictable: links planted at the
    names tcc once used, or at the output itself, lead nowhere."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (".y.pt.tmp", ".s.json.tmp", "y2.pt"):
        (tmp_path / name).symlink_to(victim)
    assert main(["run", str(artifacts[1]), "--on", "sim", "--stats", "s.json", "-o", "y.pt"]) == 0
    assert main(["run", str(artifacts[0]), "-o", "y2.pt"]) == 0
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "y2.pt").is_symlink()  # the link was replaced, not followed
    for name in ("y.pt", "y2.pt"):
        assert isinstance(torch.load(tmp_path / name, weights_only=True), torch.Tensor)
    assert json.loads((tmp_path / "s.json").read_text())["cycles"] > 0
    assert (tmp_path / "y.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert staging(tmp_path) == []


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------------------------
# reading an artifact: no links followed, bounded

def _link_outside(name: str):
    """Replace `name` (a file or a folder) by a symbolic link to a copy of it outside the
    artifact: the contents (and hashes) are the same, only the link is wrong."""
    def edit(artifact: Path) -> None:
        inside, outside = artifact / name, artifact.parent / f"outside-{name}"
        shutil.move(inside, outside)
        inside.symlink_to(outside, target_is_directory=outside.is_dir())
    return edit


def _write_manifest(data: bytes):
    return lambda artifact: (artifact / "manifest.json").write_bytes(data)


def _example_inputs(data: bytes):
    def edit(artifact: Path) -> None:
        (artifact / "example_inputs.npz").write_bytes(data)
        _rehash(artifact, "example_inputs.npz")
    return edit


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@lru_cache(maxsize=None)
def _npz_bomb() -> bytes:
    """x.npy deflated: 512 MiB of float32 zeros in 512 KB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as member:
        member.write(_npy_header((1 << 27,)))
        zeros = bytes(1 << 24)
        for _ in range(32):
            member.write(zeros)
    return buffer.getvalue()


def _npz_stored(header: bytes, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", header + data)
    return buffer.getvalue()


BROKEN_ARTIFACTS = [
    ("graph-a-link", _link_outside("graph.tcc"), "graph.tcc: a symbolic link; an artifact holds its own files"),
    ("report-folder-a-link", _link_outside("report"), "report: a symbolic link"),
    ("manifest-a-link", _link_outside("manifest.json"), "manifest.json: a symbolic link"),
    ("manifest-nested-deep", _write_manifest(b"[" * 100_000 + b"]" * 100_000), "manifest.json: JSON nested too deep"),
    ("manifest-huge", _write_manifest(b"{}" + b" " * (16 << 20)),
     "manifest.json: 16,777,218 bytes; tcc reads at most 16,777,216 from it"),
    ("example-inputs-deflate-bomb", lambda a: _example_inputs(_npz_bomb())(a),
     "example_inputs.npz: cannot be read (ValueError: its members claim more bytes than it holds)"),
    ("example-inputs-header-claims-more", _example_inputs(_npz_stored(_npy_header((1 << 29,)), bytes(256))),
     "example_inputs.npz: cannot be read (ValueError: member 'x.npy' holds 256 bytes of array data, its header "
     "describes float32[536870912])"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corrupt, message", [c[1:] for c in BROKEN_ARTIFACTS], ids=[c[0] for c in BROKEN_ARTIFACTS])
def test_a_broken_artifact_is_refused(artifacts, corrupt, message, command, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts[0], broken)
    corrupt(broken)
    torch.save({"inputs": torch.randn(4, 8, 8)}, tmp_path / "data.pt")
    argv = [a.format(x=broken, t=tmp_path, d=tmp_path / "data.pt") for a in COMMANDS[command]]
    expect_refused(argv, message, tmp_path, capfd)
