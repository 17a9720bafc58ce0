"""The attnfast wheel a GPU run installs, built here, and the check there that the installed code is this checkout's.

    python benchmarks/gpu_wheel.py build [--out .gpu]          # here, before the device call
    python -P benchmarks/gpu_wheel.py verify [--manifest .gpu/attnfast-wheel.json]   # there, after the install

Why a wheel: ``pip install --no-build-isolation .`` needs setuptools >= 64 and ``wheel`` in the target
Python (a fresh 3.12 venv has neither: "No module named 'setuptools'", then "invalid command
'bdist_wheel'"), while installing a pure-Python wheel needs nothing but pip.

``build`` copies what setup.py packages (setup.py, pyproject.toml, README.md, attnfast/, kernels/; no
caches) into a temporary folder, runs ``pip wheel --no-deps --no-build-isolation --no-index`` there
with this Python (so the checkout gets no build/ or egg-info), and checks the wheel: ``py3-none-any``,
every ``kernels/*.py`` as ``attnfast/kernels/*.py``, every ``attnfast/**.py``, no top-level
``kernels/``, and each file byte-identical to the checkout. It writes into ``--out`` (default
``.gpu/``, git-ignored: name it in the device call's ``carry``; ``$GPU_WHEEL_DIR`` moves it) the wheel, alone, and
``attnfast-wheel.json``: the wheel's name and sha256, the git commit and whether attnfast/, kernels/
or setup.py had uncommitted changes, and the sha256 of every package file.

``verify`` imports attnfast the way the benchmarks will (run it with ``python -P`` from anywhere) and
compares the installed package files with the checkout beside this script and with the manifest:
the same file set and the same bytes, or it names each difference and exits 1. It also fails when
attnfast is imported from the checkout itself (an editable install), unless ``--allow-checkout``,
or when a top-level ``kernels`` module is importable. ``gpu_bench.py`` runs the same check and
records it in its results; it measures nothing when the check fails.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.environ.get("GPU_WHEEL_DIR") or os.path.join(REPO, ".gpu")  # gpu_run.sh reads the same variable
MANIFEST = "attnfast-wheel.json"
SOURCES = ("setup.py", "pyproject.toml", "README.md")
PACKAGE_EXT = (".py",)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_bytes(f.read())


def _walk(root: str):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(PACKAGE_EXT):
                yield os.path.join(folder, name)


def checkout_files(repo: str = REPO) -> dict:
    """``{installed path: sha256}`` of the package files in a checkout: ``attnfast/**`` as is,
    ``kernels/**`` as ``attnfast/kernels/**`` (setup.py's package_dir)."""
    out = {}
    for src, dst in (("attnfast", "attnfast"), ("kernels", "attnfast/kernels")):
        base = os.path.join(repo, src)
        for path in _walk(base):
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            out[f"{dst}/{rel}"] = sha256_file(path)
    return out


def installed_files(package_dir: str) -> dict:
    """``{attnfast/...: sha256}`` of an installed attnfast package folder."""
    return {"attnfast/" + os.path.relpath(p, package_dir).replace(os.sep, "/"): sha256_file(p)
            for p in _walk(package_dir)}


def compare(found: dict, expected: dict) -> dict:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(p for p in set(found) & set(expected) if found[p] != expected[p])
    return {"missing": missing, "extra": extra, "changed": changed, "same": not (missing or extra or changed)}


def _git(repo, *args):
    """git's stripped output in ``repo``, or None where git is missing, fails or hangs (read-only: no index lock)."""
    try:
        r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, errors="replace", timeout=30,
                           env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------
def wheel_files(path: str) -> dict:
    """``{name: sha256}`` of the files in a wheel, and the WHEEL tags."""
    with zipfile.ZipFile(path) as z:
        return {n: sha256_bytes(z.read(n)) for n in z.namelist() if not n.endswith("/")}


def check_wheel(path: str, repo: str = REPO) -> dict:
    """The wheel holds exactly the checkout's package files (plus its .dist-info), byte for byte."""
    name = os.path.basename(path)
    problems = []
    if not name.endswith("-py3-none-any.whl"):
        problems.append(f"{name} is not a py3-none-any wheel")
    files = wheel_files(path)
    top = sorted({n.split("/", 1)[0] for n in files})
    if any(t == "kernels" for t in top):
        problems.append("the wheel installs a top-level kernels/ package")
    package = {n: h for n, h in files.items() if n.startswith("attnfast/") and n.endswith(PACKAGE_EXT)}
    diff = compare(package, checkout_files(repo))
    if not diff["same"]:
        problems.append(f"wheel vs checkout: {json.dumps({k: v for k, v in diff.items() if k != 'same'})}")
    if not any(n.startswith("attnfast/kernels/") for n in package):
        problems.append("no attnfast/kernels/*.py in the wheel")
    others = [t for t in top if t != "attnfast" and not t.endswith(".dist-info")]
    if others:
        problems.append(f"unexpected top-level entries {others}")
    return {"problems": problems, "files": package}


def build(out_dir: str = DEFAULT_OUT, repo: str = REPO, python: str = sys.executable) -> dict:
    for mod in ("setuptools", "wheel"):
        r = subprocess.run([python, "-c", f"import {mod}"], capture_output=True, timeout=120)
        if r.returncode:
            raise SystemExit(f"error: building the wheel needs {mod} in {python} (pip install setuptools wheel); "
                             "the GPU machine then needs neither")
    with tempfile.TemporaryDirectory(prefix="attnfast-wheel-") as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for name in SOURCES:
            shutil.copy2(os.path.join(repo, name), src)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
        for folder in ("attnfast", "kernels"):
            shutil.copytree(os.path.join(repo, folder), os.path.join(src, folder), ignore=ignore)
        dist = os.path.join(tmp, "dist")
        r = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", dist, src], capture_output=True, text=True, timeout=600, cwd=tmp)
        if r.returncode:
            raise SystemExit(f"error: pip wheel failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        wheels = [w for w in os.listdir(dist) if w.endswith(".whl")]
        if len(wheels) != 1:
            raise SystemExit(f"error: expected one wheel from pip wheel, got {wheels}")
        built = os.path.join(dist, wheels[0])
        checked = check_wheel(built, repo)
        if checked["problems"]:
            raise SystemExit("error: the built wheel is not this checkout's package:\n  " +
                             "\n  ".join(checked["problems"]))
        os.makedirs(out_dir, exist_ok=True)
        for old in os.listdir(out_dir):
            if old.endswith(".whl") or old == MANIFEST:
                os.unlink(os.path.join(out_dir, old))
        final = os.path.join(out_dir, wheels[0])
        shutil.copy2(built, final)
    status = _git(repo, "status", "--porcelain", "--", "attnfast", "kernels", "setup.py")
    manifest = {
        "schema": "attnfast.gpu_wheel/1",
        "wheel": os.path.basename(final),
        "wheel_sha256": sha256_file(final),
        "commit": _git(repo, "rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "built_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "built_with": {"python": sys.version.split()[0]},
        "files": checked["files"],
    }
    from attnfast.train.checkpoint import atomic_write

    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: json.dump(manifest, f, indent=1), mode="w")
    return manifest


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
def verify(repo: str = REPO, manifest_path: str | None = None, allow_checkout: bool = False) -> dict:
    """Whether the attnfast this Python imports is the checkout's code; see the module docstring."""
    import importlib.util

    result = {"ok": False, "problems": []}
    try:
        import attnfast
        import attnfast.kernels  # noqa: F401
    except Exception as e:  # not installed, or broken
        result["problems"].append(f"import attnfast.kernels failed: {type(e).__name__}: {e}")
        return result
    pkg = os.path.realpath(os.path.dirname(attnfast.__file__))
    kdir = os.path.realpath(os.path.dirname(attnfast.kernels.__file__))
    repo = os.path.realpath(repo)
    result.update(location=pkg, kernels=kdir, version=getattr(attnfast, "__version__", None))
    from_checkout = pkg == os.path.join(repo, "attnfast")
    result["from_checkout"] = from_checkout
    if from_checkout and not allow_checkout:
        result["problems"].append(f"attnfast is imported from the checkout ({pkg}), not from an install")
    if kdir != os.path.join(pkg, "kernels") and not (from_checkout and kdir == os.path.join(repo, "kernels")):
        result["problems"].append(f"attnfast.kernels comes from {kdir}, not from beside attnfast ({pkg})")
    if importlib.util.find_spec("kernels") is not None:
        result["problems"].append("a top-level 'kernels' module is importable")
    expected = checkout_files(repo)
    if from_checkout:
        found = expected
    else:
        found = installed_files(pkg)
    vs_checkout = compare(found, expected)
    result["files"] = len(found)
    result["vs_checkout"] = vs_checkout
    if not vs_checkout["same"]:
        result["problems"].append("installed files differ from the checkout: " +
                                  json.dumps({k: v[:10] for k, v in vs_checkout.items() if k != "same" and v}))
    manifest_path = manifest_path or os.path.join(DEFAULT_OUT, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        result["wheel"] = {k: manifest.get(k) for k in ("wheel", "wheel_sha256", "commit", "dirty", "built_utc")}
        vs_wheel = compare(found, manifest.get("files", {}))
        result["vs_wheel"] = vs_wheel
        if not vs_wheel["same"] and not from_checkout:
            result["problems"].append("installed files differ from the wheel's manifest: " +
                                      json.dumps({k: v[:10] for k, v in vs_wheel.items() if k != "same" and v}))
    elif not from_checkout:
        result["problems"].append(f"no wheel manifest at {manifest_path}")
    result["ok"] = not result["problems"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the wheel and its manifest (here)")
    b.add_argument("--out", default=DEFAULT_OUT)
    v = sub.add_parser("verify", help="check the installed attnfast against the checkout (there)")
    v.add_argument("--manifest", default=None)
    v.add_argument("--repo", default=REPO)
    v.add_argument("--allow-checkout", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "build":
        m = build(os.path.abspath(args.out))
        print(f"{os.path.join(args.out, m['wheel'])}: {len(m['files'])} package files, commit {m['commit']}"
              f"{' (uncommitted changes)' if m['dirty'] else ''}; manifest {os.path.join(args.out, MANIFEST)}")
        return 0
    r = verify(args.repo, args.manifest, args.allow_checkout)
    print(json.dumps(r, indent=1))
    if not r["ok"]:
        print("error: " + "; ".join(r["problems"]), file=sys.stderr)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
