"""`make wheels`: an offline wheelhouse for another machine (an air-gapped cluster node), made on a
machine with an index: samlm's own wheel and every wheel its extras need, for the node's Python
version and platform, *without* torch (nor torch's CUDA wheels): the node has its own PyTorch.

    python scripts/wheelhouse.py OUT [--extras harness] [--python-version 3.11]
                                     [--platform manylinux2014_x86_64 ...] [--torch 2.13.0]

Install on the node (docs/scale.md), with no index:

    python3 -m venv --system-site-packages ENV      # sees the node's torch
    ENV/bin/pip install --no-index --find-links OUT 'samlm[harness]'

torch is never downloaded: the resolver is handed a placeholder torch wheel of version ``--torch``
(its one dependency: setuptools), so it resolves the rest as it would next to that torch, and the placeholder is
then dropped (as would be any torch, triton or nvidia-* wheel). Everything else is pip's ordinary
``pip download --only-binary=:all: --platform ... --python-version ...`` (pip's own configuration,
proxies and certificates apply).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "placeholder"  # the local version label of the stand-in torch
DROPPED = ("torch-", "triton-", "nvidia_", "nvidia-")  # the node's PyTorch brings these


def placeholder_torch(folder: Path, version: str) -> Path:
    """A wheel that says 'torch <version>+placeholder, needs setuptools' and holds nothing else."""
    full = f"{version}+{PLACEHOLDER}"
    info = f"torch-{full}.dist-info"
    path = folder / f"torch-{full}-py3-none-any.whl"
    files = {
        # setuptools: torch requires a recent one, and a Python 3.11 venv over the node's torch
        # shadows the node's with its own older copy, which pip must then upgrade from here.
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {full}\nRequires-Dist: setuptools\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: samlm-wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return path


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def samlm_wheel(out: Path, *, isolation: bool = True) -> Path:
    """samlm's own wheel into ``out`` (replacing an older one), built from a fresh copy of the
    sources: an in-tree build would leave build/ behind, whose stale modules a later build packs."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("samlm-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="samlm-sdist-") as tmp:
        source = Path(tmp) / "samlm"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg"):
            if (ROOT / name).is_file():
                shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        pip(
            "wheel", "--no-deps", "--wheel-dir", str(out), *([] if isolation else ["--no-build-isolation"]), str(source)
        )
    (wheel,) = out.glob("samlm-*.whl")
    return wheel


def build(out: Path, extras: str, python_version: str, platforms: list[str], torch: str, isolation: bool) -> None:
    wheel = samlm_wheel(out, isolation=isolation)
    with tempfile.TemporaryDirectory(prefix="samlm-wheelhouse-") as tmp:
        stub = placeholder_torch(Path(tmp), torch)
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={torch}+{PLACEHOLDER}\n")
        platform_args = [arg for name in platforms for arg in ("--platform", name)]
        requirement = (
            f"samlm[{extras}] @ {wheel.resolve().as_uri()}" if extras else f"samlm @ {wheel.resolve().as_uri()}"
        )
        pip(
            "download",
            "--dest",
            str(out),
            "--only-binary=:all:",
            *platform_args,
            "--python-version",
            python_version,
            "--find-links",
            str(stub.parent),
            "--constraint",
            str(constraints),
            requirement,
        )
    dropped = [path for path in out.iterdir() if path.name.lower().startswith(DROPPED)]
    for path in dropped:
        path.unlink()
    wheels = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(p.stat().st_size for p in wheels)
    print(
        f"wheelhouse {out}: {len(wheels)} wheels, {total / 2**20:.1f} MiB, for cp{python_version.replace('.', '')} "
        f"{' '.join(platforms)}, extras [{extras}], without torch (dropped {len(dropped)}); largest: "
        + ", ".join(f"{p.name.split('-')[0]} {p.stat().st_size / 2**20:.1f}" for p in wheels[:5]),
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the wheelhouse folder (created; samlm's old wheel replaced)")
    parser.add_argument("--extras", default="harness", help="samlm's extras, comma-separated ('' for none)")
    parser.add_argument("--python-version", default="3.11", help="the node's Python, e.g. 3.11")
    parser.add_argument(
        "--platform", action="append", help="a wheel platform tag the node takes (repeatable); manylinux2014_x86_64"
    )
    parser.add_argument("--torch", default="2.13.0", help="the node's torch version the rest is resolved against")
    parser.add_argument(
        "--no-build-isolation", action="store_true", help="build samlm's wheel with this Python's setuptools"
    )
    parser.add_argument("--samlm-only", action="store_true", help="only samlm's own wheel (no index needed)")
    args = parser.parse_args(argv)
    if args.samlm_only:
        print(samlm_wheel(args.out, isolation=not args.no_build_isolation))
        return 0
    build(
        args.out,
        args.extras,
        args.python_version,
        args.platform or ["manylinux2014_x86_64"],
        args.torch,
        not args.no_build_isolation,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
