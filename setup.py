"""Shim for tools that expect setup.py; the package is described in pyproject.toml."""

from setuptools import setup

setup()
