"""The kernel tests' one AOT run per session: ``python -m attnfast.kernels.aot`` over every registered
configuration, the binaries the benchmark shapes' launches run (``benchmarks/aot_launches.py``,
captured as Triton specializes them at launch; they replace the plain builds of the configurations
they reach) and the fixture kernels (``aot_fixture_kernels.py``), for sm_80 and sm_90, in a
subprocess without TRITON_INTERPRET (the session's kernels are the interpreter's, which cannot be
compiled). ``test_aot_compile.py``, ``test_ptx_evidence.py`` and others read the same report.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

FIXTURE_KERNELS = os.path.join(os.path.dirname(__file__), "aot_fixture_kernels.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHES = os.path.join(ROOT, "benchmarks", "aot_launches.py")
FIXTURE_PREFIX = "fixture."
CAPS = (80, 90)
TIMEOUT_S = 1500


def _aot_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.fixture
def aot_env():
    """The AOT subprocess's environment: this one without TRITON_INTERPRET."""
    return _aot_env()


@pytest.fixture(scope="session")
def fixture_kernels():
    """The fixture kernel module (its expectations: ``FLASH_TILES``, ``ATOMICS``)."""
    spec = importlib.util.spec_from_file_location("aot_fixture_kernels", FIXTURE_KERNELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def aot_report(tmp_path_factory):
    """The AOT report (see ``attnfast.kernels.aot``) plus ``returncode``, ``log`` and ``markdown``."""
    out = tmp_path_factory.mktemp("aot")
    cmd = [sys.executable, "-m", "attnfast.kernels.aot", "--caps", *map(str, CAPS), "--module", FIXTURE_KERNELS,
           "--launches", LAUNCHES, "--json", str(out / "aot.json"), "--markdown", str(out / "aot.md")]
    # its own process group: on a timeout the compile workers go too, not just their parent
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_aot_env(),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"AOT run exceeded {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert (out / "aot.json").exists(), f"AOT run produced no report:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads((out / "aot.json").read_text())
    report["returncode"] = proc.returncode
    report["log"] = stdout[-5000:] + stderr[-2000:]
    report["markdown"] = (out / "aot.md").read_text()
    return report


@pytest.fixture(scope="session")
def registry_results(aot_report):
    """{(binary name, cap): result} of the registered configurations' binaries (fixtures left out): the
    launch binaries (``name@hash``, with ``base``: the configuration they specialize) and the plain
    builds of the configurations no captured launch reaches."""
    return {(r["name"], r["cap"]): r for r in aot_report["results"] if not r["name"].startswith(FIXTURE_PREFIX)}


@pytest.fixture(scope="session")
def launch_results(registry_results):
    """{(binary name, cap): result} of the binaries the captured benchmark launches run."""
    return {k: r for k, r in registry_results.items() if r.get("base")}


@pytest.fixture(scope="session")
def results_by_config(registry_results):
    """{registered configuration: [its results]}: a launch binary counts for the configuration it
    specializes (``base``), a plain build for its own."""
    out = {}
    for r in registry_results.values():
        out.setdefault(r.get("base") or r["name"], []).append(r)
    return out


@pytest.fixture(scope="session")
def fixture_results(aot_report):
    """{(config name, cap): result} of the fixture kernels."""
    return {(r["name"], r["cap"]): r for r in aot_report["results"] if r["name"].startswith(FIXTURE_PREFIX)}
