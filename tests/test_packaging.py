"""The install paths agree: pyproject, environment.yml, Makefile, README, CI."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _name(req):
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def _extras_requirements():
    """Every extra's requirements, without the extras that only name other extras (``memopt[lab,grade]``)."""
    return [r for reqs in PROJECT["optional-dependencies"].values() for r in reqs if _name(r) != PROJECT["name"]]


def test_environment_yml_matches_pyproject():
    wanted = PROJECT["dependencies"] + _extras_requirements()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(set(wanted)) == sorted(pip), "environment.yml must list pyproject's dependencies and every extra"
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert py.replace("python", "") == PROJECT["requires-python"]


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: setup", makefile, re.M) and re.search(r"^lab: setup", makefile, re.M)
    assert '-e ".[dev]"' in makefile


def test_required_dependencies_are_declared():
    deps = {_name(d) for d in PROJECT["dependencies"]}
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "ipywidgets", "matplotlib", "tqdm"):
        assert lib in deps


def test_runtime_dependencies_are_what_a_hosted_runtime_needs_and_tools_are_extras():
    """Colab brings its own Jupyter: the lab, authoring and test tools are extras, and `dev` pulls them all."""
    deps = {_name(d) for d in PROJECT["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    for tool in ("jupyterlab", "nbval", "nbclient", "nbformat", "ipykernel", "pytest"):
        assert tool not in deps, f"{tool} is a tool, not a runtime dependency"
    assert {"jupyterlab", "ipykernel"} <= extras["lab"]
    assert "nbformat" in extras["grade"]
    assert {"nbval", "nbclient", "pytest"} <= extras["dev"]
    dev_self = next(r for r in PROJECT["optional-dependencies"]["dev"] if _name(r) == PROJECT["name"])
    assert {"lab", "grade"} <= set(dev_self.split("[", 1)[1].rstrip("]").split(","))


def test_repository_url_is_configured_once_and_the_readme_has_no_placeholder():
    url = PROJECT["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url)
    readme = (ROOT / "README.md").read_text()
    assert "<owner>" not in readme
    colab = readme.split("## On Colab", 1)[1].split("\n## ", 1)[0]
    assert f"git+{url}" in colab and url.removeprefix("https://github.com/") in colab
