"""Packaging that pyproject.toml cannot say: the built-in voices inside the wheel.

The repository keeps them in the top-level ``voices/`` folder (with the script that made
them); installed, they are the package data ``gateway/builtin_voices/``, where
``Settings.resolved_builtin_voices_dir`` looks first. pyproject's ``packages.find`` cannot map
a folder from outside ``gateway/`` into it, so the package list is built here. Everything
else (name, dependencies, entry points) is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gateway*"]), "gateway.builtin_voices"],
    package_dir={"gateway.builtin_voices": "voices"},
    package_data={
        "gateway.builtin_voices": ["manifest.json", "*.flac"],
        "gateway.http": ["api_docs_assets/*"],
        "gateway.http.playground": ["static/*"],
    },
)
