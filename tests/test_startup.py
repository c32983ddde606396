"""A fast, quiet command line: ``import vestis`` and ``vestis --help`` load no heavy library,
and the process environment is set by the entry points, not by importing a module."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "faiss", "matplotlib", "onnxruntime", "ray", "pyarrow")

HELP_THEN_LIST_MODULES = """
import sys

import click
import typer.main

import vestis
import vestis.cli

command = typer.main.get_command(vestis.cli.app)
root = click.Context(command, info_name="vestis")
command.get_help(root)
for name, sub in command.commands.items():
    sub.get_help(click.Context(sub, parent=root, info_name=name))
print("modules:", *sorted({module.split(".")[0] for module in sys.modules}))
"""


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env, check=True)
    return result.stdout


def test_help_imports_no_heavy_library():
    last = run_python(HELP_THEN_LIST_MODULES).splitlines()[-1]
    assert last.startswith("modules:")
    loaded = set(last.split()[1:])
    assert "vestis" in loaded
    assert not loaded & set(HEAVY), f"imported by `vestis --help`: {loaded & set(HEAVY)}"


def test_lazy_exports_still_work():
    import vestis

    assert vestis.DEFAULT_MODEL == "vestis-lite0"
    from vestis.models import DEFAULT_MODEL, Encoder

    assert vestis.Encoder is Encoder and vestis.DEFAULT_MODEL == DEFAULT_MODEL
    assert {"Catalog", "evaluate", "load_image"} <= set(dir(vestis))
    assert callable(vestis.evaluate) and callable(vestis.load_image)


def test_importing_modules_leaves_the_environment_alone():
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY")
    env = {key: value for key, value in os.environ.items() if key not in names}
    show = f"print(sorted(name for name in {names!r} if name in os.environ))"
    assert run_python(f"import os, vestis, vestis.cli; {show}", env).strip() == "[]"
    # The catalog sets OMP_WAIT_POLICY just before FAISS loads; the HF variables wait for
    # the sentence model itself.
    loaded = run_python(f"import os, vestis.text.encoder; {show}", env).strip()
    assert loaded == "['OMP_WAIT_POLICY']"


def test_entry_point_environment_keeps_the_users_choice(monkeypatch):
    from vestis import _env

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _env.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
