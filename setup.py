"""Packaging: the plugins in ./tasks install as `mmpo_tasks`, so the name cannot collide with
any other installed package called `tasks`. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

packages = find_packages(include=["mmpo", "mmpo.*"])
packages += ["mmpo_tasks"] + [f"mmpo_tasks.{p}" for p in find_packages("tasks")]
setup(packages=packages, package_dir={"mmpo_tasks": "tasks"})
