"""Which packages an install of this tree provides; everything else about the project is in pyproject.toml.

The SDK (`loom`, from client/) always; of the server packages (contract, api, worker, gpu_kernels), those present
in the tree: the API image copies no worker code and the worker image only `api/db` of the API, so a fixed list
would not build there.
"""

from setuptools import find_packages, setup

SERVER_PACKAGES = ["contract", "contract.*", "api", "api.*", "worker", "worker.*", "gpu_kernels"]

setup(packages=["loom", "loom.types", *find_packages(include=SERVER_PACKAGES)])
