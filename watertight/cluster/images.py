"""The images the local cluster runs, built on this machine: no image registry is reachable here.

Owns: a Debian base image made with debootstrap (bookworm, minbase, with Python 3.11 and its venv
module: what ``python:3.11-slim-bookworm`` gives a registry user), cached in podman's storage under
a tag keyed by what goes into it, and above it this machine's CA bundle for pip; the core, Patroni, Locust and etcd images built from
``core-app/Containerfile`` on that base with podman (``--network host``: the RUN steps apt-get and
pip-install from the package registries); the pause image (the static binary built with the
Kubernetes binaries); exporting them and importing them into the cluster's containerd, skipped
for an image containerd already holds at the same podman image ID.
Never: pull from an image registry, write into the work tree, or change podman's configuration
under /etc (its settings are a file of ours, passed as CONTAINERS_CONF).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CONTAINERFILE = REPO_ROOT / "core-app" / "Containerfile"
CACHE_ENV = "WATERTIGHT_IMAGE_CACHE"
CACHE_DEFAULT = Path("/var/cache/watertight/images")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what the Containerfile expects of its Python base: python (3.11), its venv module, TLS roots
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_SOURCES = (
    f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
    f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
    f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main\n"
)
BASE_REPOSITORY = "localhost/watertight/base"
BUILD_BASE_REPOSITORY = "localhost/watertight/build-base"
BUILD_CA_PATH = "/etc/ssl/certs/watertight-build-ca.pem"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PAUSE_REPOSITORY = "localhost/watertight/pause"
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1800
# an idle machine needs a minute or two; one shared with other work took 15 minutes for four
SAVE_TIMEOUT_S = 1800
IMPORT_TIMEOUT_S = 1800
Progress = Callable[[str], None]


class ImageError(RuntimeError):
    """An image could not be made or imported; the message says which and where the log is."""


@dataclass(frozen=True)
class Image:
    """One image the stack names, and how it is built."""

    reference: str  # e.g. localhost/watertight/core:0.1.0, as the stack names it
    target: str | None  # the Containerfile stage; None for the pause image


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or CACHE_DEFAULT)


def containers_conf() -> Path:
    """podman's and buildah's settings for our builds: runc (crun fails on this machine's hybrid
    cgroups) and an open-file limit within this machine's hard limit (podman asks for 1048576 and
    runc cannot set more than the hard limit)."""
    limits = []
    for name, kind in (("nofile", resource.RLIMIT_NOFILE),):
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            limits.append(f'"{name}={hard}:{hard}"')
    path = cache_dir() / "containers.conf"
    text = (
        "# written by watertight.cluster.images (CONTAINERS_CONF of its podman builds)\n"
        f"[containers]\ndefault_ulimits = [{', '.join(limits)}]\n"
        '[engine]\nruntime = "runc"\n'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def _run(argv: list[str], what: str, log: Path, timeout_s: float, **kwargs: object) -> str:
    with open(log, "ab") as handle:
        handle.write(f"\n$ {' '.join(argv)}\n".encode())
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as error:
        raise ImageError(f"{what} took more than {timeout_s:.0f} s; log {log}") from error
    with open(log, "ab") as handle:
        handle.write(done.stdout or b"")
        handle.write(done.stderr or b"")
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout or b"").decode(errors="replace").splitlines()[-20:])
        raise ImageError(f"{what} failed (exit {done.returncode}); log {log}\n{tail}")
    return (done.stdout or b"").decode(errors="replace").strip()


def _podman(*args: str, what: str, log: Path, timeout_s: float = BUILD_TIMEOUT_S) -> str:
    return _run(["podman", *args], what, log, timeout_s, env=_env())


def _exists(reference: str) -> bool:
    done = subprocess.run(
        ["podman", "image", "exists", reference], env=_env(), capture_output=True, check=False
    )
    return done.returncode == 0


def _image_id(reference: str, log: Path) -> str:
    return _podman(
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        reference,
        what=f"podman image inspect {reference}",
        log=log,
    )


def base_key() -> str:
    """What the base image is made of; a change makes a new base (and so rebuilds the images)."""
    material = json.dumps(
        {"suite": DEBIAN_SUITE, "mirror": DEBIAN_MIRROR, "packages": BASE_PACKAGES, "sources": BASE_SOURCES}
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def ensure_base(progress: Progress, log: Path) -> str:
    """The Debian base image (debootstrap, about a minute the first time), made once per key."""
    reference = f"{BASE_REPOSITORY}:{base_key()}"
    if _exists(reference):
        progress(f"base image {reference} is cached")
        return reference
    progress(
        f"making the base image {reference}: debootstrap {DEBIAN_SUITE} minbase + {', '.join(BASE_PACKAGES)} (about a minute)"
    )
    scratch = Path(tempfile.mkdtemp(prefix="watertight-debootstrap-", dir=cache_dir()))
    root = scratch / "root"
    try:
        _run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE, str(root), DEBIAN_MIRROR],
            "debootstrap", log, DEBOOTSTRAP_TIMEOUT_S,
        )  # fmt: skip
        (root / "etc" / "apt" / "sources.list").write_text(BASE_SOURCES)
        shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        for lists in (root / "var" / "lib" / "apt" / "lists").glob("*_*"):
            lists.unlink()
        tarball = scratch / "root.tar"
        _run(
            ["tar", "-C", str(root), "-cf", str(tarball), "."],
            "tar of the debootstrap tree",
            log,
            DEBOOTSTRAP_TIMEOUT_S,
        )
        _podman(
            "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "CMD [\"python\"]", str(tarball), reference,
            what="podman import of the base", log=log,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return reference


def host_ca_bundle() -> Path:
    """The trust anchors of this machine (Debian's bundle, plus whatever this machine's operator
    added, such as a TLS-inspecting proxy's CA)."""
    found = ssl.get_default_verify_paths().cafile or os.environ.get("SSL_CERT_FILE") or SYSTEM_CA_BUNDLE
    return Path(found) if Path(found).is_file() else Path(SYSTEM_CA_BUNDLE)


def ensure_build_base(progress: Progress, log: Path) -> str:
    """The base the Containerfile builds on: the Debian base plus this machine's trust anchors for
    pip (PIP_CERT; pip in a venv otherwise trusts only its own certifi bundle), so the RUN steps
    fetch from PyPI the way this machine does. Keyed by the base and the bundle's content."""
    base = ensure_base(progress, log)
    bundle = host_ca_bundle()
    digest = hashlib.sha256(base.encode() + bundle.read_bytes()).hexdigest()[:16]
    reference = f"{BUILD_BASE_REPOSITORY}:{digest}"
    if _exists(reference):
        return reference
    progress(f"making {reference}: {base} with this machine's CA bundle ({bundle}) for pip")
    with tempfile.TemporaryDirectory(prefix="watertight-build-base-", dir=cache_dir()) as context:
        shutil.copyfile(bundle, Path(context) / "ca.pem")
        (Path(context) / "Containerfile").write_text(
            f"FROM {base}\nCOPY ca.pem {BUILD_CA_PATH}\nENV PIP_CERT={BUILD_CA_PATH}\n"
        )
        _podman("build", "--pull=never", "-t", reference, context, what=f"podman build {reference}", log=log)
    return reference


def images_of(core: str, patroni: str, locust: str, etcd: str) -> list[Image]:
    """The stack's images and the Containerfile stage each is built from."""
    return [
        Image(core, "core"),
        Image(patroni, "patroni"),
        Image(locust, "locust"),
        Image(etcd, "etcd"),
    ]


def pause_reference(version: str) -> str:
    return f"{PAUSE_REPOSITORY}:{version.replace('+', '_').replace('~', '_')}"


def build(images: list[Image], progress: Progress, log: Path) -> dict[str, str]:
    """Build every image (podman's layer cache makes an unchanged one take seconds); returns
    reference -> podman image ID."""
    base = ensure_build_base(progress, log)
    built: dict[str, str] = {}
    for image in images:
        assert image.target is not None
        progress(
            f"building {image.reference} (Containerfile stage {image.target}; pip and apt inside, cached layers reused)"
        )
        _podman(
            "build", "--network", "host", "--pull=never", "--layers",
            "-f", str(CONTAINERFILE), "--target", image.target,
            "--build-arg", f"PYTHON_IMAGE={base}", "-t", image.reference, str(REPO_ROOT),
            what=f"podman build {image.reference}", log=log,
        )  # fmt: skip
        built[image.reference] = _image_id(image.reference, log)
    return built


def build_pause(version: str, pause_binary: Path, progress: Progress, log: Path) -> tuple[str, str]:
    """The pod sandbox image: the static pause binary of the Kubernetes build, alone."""
    reference = pause_reference(version)
    if not _exists(reference):
        progress(f"building {reference} from the pause binary")
        with tempfile.TemporaryDirectory(prefix="watertight-pause-", dir=cache_dir()) as context:
            shutil.copy2(pause_binary, Path(context) / "pause")
            (Path(context) / "Containerfile").write_text(
                'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
            )
            _podman(
                "build", "--pull=never", "-t", reference, context, what=f"podman build {reference}", log=log
            )
    return reference, _image_id(reference, log)


def import_into(
    built: dict[str, str], ctr: list[str], stamp_file: Path, progress: Progress, log: Path
) -> None:
    """Import each image into the cluster's containerd (namespace k8s.io) unless it already holds
    that reference at the same podman image ID (``stamp_file`` remembers what was imported)."""
    stamps: dict[str, str] = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    present = set(_run([*ctr, "-n", "k8s.io", "images", "list", "-q"], "ctr images list", log, 60).split())
    for reference, image_id in built.items():
        if stamps.get(reference) == image_id and reference in present:
            progress(f"{reference} is in the cluster's containerd already")
            continue
        progress(f"importing {reference} into the cluster's containerd")
        with tempfile.TemporaryDirectory(prefix="watertight-image-", dir=cache_dir()) as scratch:
            archive = Path(scratch) / "image.tar"
            _podman("save", "--format", "docker-archive", "-o", str(archive), reference,
                    what=f"podman save {reference}", log=log, timeout_s=SAVE_TIMEOUT_S)  # fmt: skip
            _run([*ctr, "-n", "k8s.io", "images", "import", str(archive)],
                 f"ctr images import {reference}", log, IMPORT_TIMEOUT_S)  # fmt: skip
        stamps[reference] = image_id
        stamp_file.write_text(json.dumps(stamps, indent=1, sort_keys=True))
