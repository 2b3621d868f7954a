"""Package layout: iicl_fast/ plus kernels/ shipped as the subpackage iicl_fast.kernels
(`kernels` alone is taken on PyPI). Metadata lives in pyproject.toml."""
from setuptools import setup

setup(
    packages=["iicl_fast", "iicl_fast.kernels"],
    package_dir={"iicl_fast": "iicl_fast", "iicl_fast.kernels": "kernels"},
    package_data={"iicl_fast": ["data/*.txt", "data/*.json"]},
    include_package_data=True,
)
