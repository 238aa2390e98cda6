"""The Kubernetes binaries of the local cluster, built from Debian's `kubernetes` source package.

Owns: fetching the source package through a private apt configuration (nothing under /etc is
changed), building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
and kubectl with Debian's Go 1.19, the static `pause` binary of the pause image, and the cache
of those binaries outside the work tree (`$WATERTIGHT_KUBERNETES_CACHE`, default
/var/cache/watertight/kubernetes/<source-version>/bin), which it reuses when present.
Must never: download anything but Debian's source package, leave the 3 GB build tree behind after
a successful build, or publish a half-built cache (binaries are moved into place only when every
one of them was built). Standard library only: `python3 -m watertight.cluster.binaries` runs it
before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "WATERTIGHT_KUBERNETES_CACHE"
CACHE_DEFAULT = Path("/var/cache/watertight/kubernetes")
SOURCE_PACKAGE = "kubernetes"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
GO_BIN_DIR = Path("/usr/lib/go-1.19/bin")
# Go 1.18+ crashes the vendored reflect2 1.0.1; Debian's 1.0.2 package replaces its sources
REFLECT2_DEBIAN = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
)
PAUSE = "pause"
# 12-15 minutes on 2 idle cores; a machine shared with other work can take hours (seen: over an
# hour without a binary linked, at a load of 12); an interrupted build resumes with Go's cache
BUILD_TIMEOUT_S = 4 * 3600
FETCH_TIMEOUT_S = 900


class BuildError(RuntimeError):
    """The binaries could not be fetched or built; the message says which step and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or CACHE_DEFAULT)


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _complete(bin_dir: Path) -> bool:
    return all(
        (bin_dir / name).is_file() and os.access(bin_dir / name, os.X_OK) for name in (*COMMANDS, PAUSE)
    )


def _version_key(version: str) -> tuple[object, ...]:
    # enough of Debian's ordering for versions of one package: numbers compare as numbers
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", version) if part)


def cached() -> tuple[str, Path] | None:
    """The newest complete set of cached binaries as (source version, bin directory), or None."""
    root = cache_root()
    if not root.is_dir():
        return None
    versions = [entry.name for entry in root.iterdir() if entry.is_dir() and _complete(entry / "bin")]
    if not versions:
        return None
    newest = max(versions, key=_version_key)
    return newest, root / newest / "bin"


def _run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout_s: float,
    what: str,
) -> None:
    output = open(log, "ab") if log else subprocess.DEVNULL
    try:
        result = subprocess.run(
            argv, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"{what} took more than {timeout_s:.0f} s; see {log}") from error
    finally:
        if log:
            output.close()  # type: ignore[union-attr]
    if result.returncode != 0:
        tail = ""
        if log and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {result.returncode}); log {log}\n{tail}")


def _apt_options(apt_dir: Path) -> list[str]:
    return [
        "-o",
        "Dir::Etc::SourceList=/dev/null",
        "-o",
        f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
        "-o",
        f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o",
        f"Dir::Cache={apt_dir / 'cache'}",
        "-o",
        "APT::Sandbox::User=root",
        "-q",
    ]


def fetch_source(work: Path, log: Path) -> tuple[str, Path]:
    """Download and unpack Debian's kubernetes source package into `work`; returns (version, tree)."""
    apt_dir = work / "apt"
    for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list.d" / "debian-src.sources").write_text(
        f"Types: deb-src\nURIs: {DEBIAN_MIRROR}\nSuites: {DEBIAN_SUITE}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    options = _apt_options(apt_dir)
    _say(f"fetching the index of Debian's source packages ({DEBIAN_SUITE}, a private apt configuration)")
    _run(["apt-get", *options, "update"], log=log, timeout_s=FETCH_TIMEOUT_S, what="apt-get update (deb-src)")
    download = work / "download"
    download.mkdir(exist_ok=True)
    _say(f"downloading the source package {SOURCE_PACKAGE} (about 30 MB)")
    _run(
        ["apt-get", *options, "source", "--download-only", SOURCE_PACKAGE],
        cwd=download,
        log=log,
        timeout_s=FETCH_TIMEOUT_S,
        what=f"apt-get source {SOURCE_PACKAGE}",
    )
    dscs = sorted(download.glob(f"{SOURCE_PACKAGE}_*.dsc"))
    if not dscs:
        raise BuildError(f"apt-get source left no {SOURCE_PACKAGE}_*.dsc in {download}")
    version = dscs[-1].name.removeprefix(f"{SOURCE_PACKAGE}_").removesuffix(".dsc")
    tree = work / "src"
    if tree.exists():
        shutil.rmtree(tree)
    _say(f"unpacking {dscs[-1].name}")
    _run(
        ["dpkg-source", "--no-check", "-x", str(dscs[-1]), str(tree)],
        log=log,
        timeout_s=FETCH_TIMEOUT_S,
        what="dpkg-source -x",
    )
    return version, tree


def _replace_reflect2(tree: Path) -> None:
    vendored = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    if not vendored.is_dir():
        raise BuildError(f"{vendored} is not in the source tree: is this still Kubernetes 1.20?")
    if not REFLECT2_DEBIAN.is_dir():
        raise BuildError(f"{REFLECT2_DEBIAN} is missing: run scripts/install-system-packages")
    for old in [*vendored.glob("*.go"), *vendored.glob("*.s")]:
        old.unlink()
    for new in [*REFLECT2_DEBIAN.glob("*.go"), *REFLECT2_DEBIAN.glob("*.s")]:
        shutil.copyfile(new, vendored / new.name)


def _upstream_version(version: str) -> str:
    # Debian's "1.20.5+really1.20.2-1": the code is 1.20.2
    upstream = version.split("-")[0]
    if "really" in upstream:
        upstream = upstream.split("really")[-1]
    return "v" + upstream.split("+")[0].split("~")[0]


def _build_tree(version: str, tree: Path, work: Path, log: Path) -> Path:
    if not (GO_BIN_DIR / "go").exists():
        raise BuildError(f"{GO_BIN_DIR / 'go'} is missing: run scripts/install-system-packages")
    env = dict(os.environ)
    env.update(
        PATH=f"{GO_BIN_DIR}:{env.get('PATH', '/usr/bin:/bin')}",
        GOFLAGS="-mod=vendor",
        GOPROXY="off",
        GOCACHE=str(work / "gocache"),
        GOPATH=str(work / "gopath"),
        KUBE_GIT_VERSION=_upstream_version(version),
        KUBE_GIT_TREE_STATE="clean",
        KUBE_VERBOSE="1",
    )
    what = " ".join(f"cmd/{name}" for name in COMMANDS)
    _say(
        f"building {', '.join(COMMANDS)} {_upstream_version(version)} with Go 1.19 "
        f"(about 12-15 minutes on 2 cores; log {log})"
    )
    started = time.monotonic()
    process = subprocess.Popen(
        ["make", "all", f"WHAT={what}"], cwd=tree, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )
    out_dir = tree / "_output" / "local" / "bin" / "linux" / "amd64"
    try:
        while True:
            try:
                process.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                elapsed_s = time.monotonic() - started
                if elapsed_s > BUILD_TIMEOUT_S:
                    process.kill()
                    process.wait()
                    raise BuildError(f"make all took more than {BUILD_TIMEOUT_S} s; log {log}") from None
                done = [name for name in COMMANDS if (out_dir / name).exists()]
                _say(
                    f"still building, {elapsed_s / 60:.0f} min so far; linked: {', '.join(done) or 'none yet'}"
                )
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"make all failed (exit {process.returncode}); log {log}\n{tail}")
    _say(f"built in {(time.monotonic() - started) / 60:.1f} min")
    pause_c = tree / "build" / "pause" / "linux" / "pause.c"
    if not pause_c.exists():
        raise BuildError(f"{pause_c} is not in the source tree")
    _run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-Werror",
            "-static",
            f'-DVERSION="{_upstream_version(version)}-watertight"',
            "-o",
            str(out_dir / PAUSE),
            str(pause_c),
        ],
        log=log,
        timeout_s=300,
        what="gcc -static pause.c",
    )
    return out_dir


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another build holds {root / '.lock'}; waiting for it (at most {BUILD_TIMEOUT_S} s)")
            deadline = time.monotonic() + BUILD_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BuildError(f"gave up waiting for {root / '.lock'}") from None
                    time.sleep(5)
        yield


def ensure() -> tuple[str, Path]:
    """The cached binaries, built first when none are cached: (source version, bin directory)."""
    found = cached()
    if found:
        return found
    root = cache_root()
    with _lock(root):
        found = cached()  # another process may have built them while we waited
        if found:
            return found
        work = root / "_build"
        work.mkdir(parents=True, exist_ok=True)
        log = work / "build.log"
        prepared = work / "prepared"  # the version of a tree unpacked earlier (a build cut short)
        if prepared.exists() and (work / "src" / "Makefile").exists():
            version, tree = prepared.read_text().strip(), work / "src"
            _say(
                f"resuming the build of {SOURCE_PACKAGE} {version} in {tree} (Go's cache keeps what was compiled)"
            )
        else:
            log.write_text("")
            version, tree = fetch_source(work, log)
            _replace_reflect2(tree)
            prepared.write_text(version + "\n")
        out_dir = _build_tree(version, tree, work, log)
        staging = root / f".{version}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "bin").mkdir(parents=True)
        for name in (*COMMANDS, PAUSE):
            shutil.copy2(out_dir / name, staging / "bin" / name)
        (staging / "SOURCE").write_text(
            f"Debian source package {SOURCE_PACKAGE} {version}, built with "
            f"{subprocess.run([str(GO_BIN_DIR / 'go'), 'version'], capture_output=True, text=True, check=False).stdout.strip()}\n"
        )
        final = root / version
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        shutil.copy2(log, final / "build.log")
        _say(f"cached in {final / 'bin'}; removing the build tree {work}")
        shutil.rmtree(work, ignore_errors=True)
        return version, final / "bin"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m watertight.cluster.binaries", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="only say whether the binaries are cached (exit 1 if not)"
    )
    args = parser.parse_args(argv)
    if args.check:
        found = cached()
        print(f"{found[0]} {found[1]}" if found else f"no Kubernetes binaries cached under {cache_root()}")
        return 0 if found else 1
    try:
        version, bin_dir = ensure()
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Kubernetes binaries ({SOURCE_PACKAGE} {version}): {bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
