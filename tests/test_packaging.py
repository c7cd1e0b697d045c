"""The install paths agree: pyproject, environment.yml, Makefile, README, CI."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req):
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(wanted) == sorted(pip), "environment.yml and pyproject.toml must list the same requirements"
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert py.replace("python", "") == pyproject["project"]["requires-python"]


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: setup", makefile, re.M) and re.search(r"^lab: setup", makefile, re.M)


def test_required_dependencies_are_declared():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "jupyterlab", "nbval",
                "ipywidgets", "matplotlib", "tqdm"):
        assert lib in deps
