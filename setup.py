"""Packaging: the plugins in ./tasks install as `mmpo_tasks`, so the name cannot collide with
any other installed package called `tasks`. A folder without an ``__init__.py`` under ``mmpo/`` or
``tasks/`` is a data folder (the report's assets, a plugin's bundled data): it is listed as a
package and ships all its files, so setuptools neither drops nor warns about it. A code package
ships its ``*.txt`` / ``*.json`` files. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = {"mmpo": "mmpo", "mmpo_tasks": "tasks"}  # package name -> folder


def _packages(name: str, folder: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_namespace_packages(folder, exclude=["*__pycache__*"])]


packages = [p for name, folder in ROOTS.items() for p in _packages(name, folder)]
package_data = {}
for package in packages:
    top, _, rest = package.partition(".")
    path = Path(ROOTS[top], *rest.split(".")) if rest else Path(ROOTS[top])
    package_data[package] = ["*.txt", "*.json"] if (path / "__init__.py").is_file() else ["*"]
setup(packages=packages, package_dir={"mmpo_tasks": "tasks"}, package_data=package_data)
