"""attnfast: fused Triton attention modules for CNN image classifiers.

The top-level ``kernels/`` folder holds the Triton kernels. It is installed as the
sub-package ``attnfast.kernels`` (never as a top-level ``kernels`` module: that name
belongs to another PyPI distribution).
"""
from setuptools import find_packages, setup

attnfast_packages = find_packages(include=["attnfast", "attnfast.*"])
kernel_packages = ["attnfast.kernels"] + [
    "attnfast.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="attnfast",
    version="0.1.0",
    description="Fused Triton attention (grid, SAGAN self-attention, residual/CBAM gates) for CNN classifiers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=attnfast_packages + kernel_packages,
    package_dir={"attnfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.23",
        "tqdm>=4.60",
        "scikit-learn>=1.1",
        "matplotlib>=3.5",
        "pillow>=9.0",
    ],
    extras_require={
        "test": ["pytest>=7.0", "pytest-benchmark>=4.0", "psutil>=5.8"],
    },
    entry_points={"console_scripts": ["attnfast=attnfast.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
