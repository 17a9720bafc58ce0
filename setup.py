"""attnfast: fused Triton attention modules for CNN image classifiers.

The top-level ``kernels/`` folder holds the Triton kernels. It is installed as the
sub-package ``attnfast.kernels`` (never as a top-level ``kernels`` module: that name
belongs to another PyPI distribution).
"""
import sys

from setuptools import find_packages, setup

# `setup.py develop` (what old pip/setuptools run for `pip install -e .`) puts the checkout on sys.path
# through an egg-link, which cannot express package_dir: `attnfast.kernels` would silently be missing.
if "develop" in sys.argv[1:]:
    sys.exit("error: `setup.py develop` cannot map kernels/ to attnfast.kernels; install with "
             "`pip install -e .` (pip >= 21.3, setuptools >= 64: PEP 660) or `pip install .`")

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
    # Lower bounds are what CI tests: .ci/run runs the suite in a second venv pinned to them
    # (ci/constraints-low.txt: the GPU machines' torch 2.11 / triton 3.6 / torchvision 0.26 stack).
    python_requires=">=3.11",
    packages=attnfast_packages + kernel_packages,
    package_dir={"attnfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=2.0",
        "tqdm>=4.66.1",  # 4.66.0 breaks on TQDM_* environment overrides (string compared with int)
        "scikit-learn>=1.5",
        "matplotlib>=3.9",
        "pillow>=10.4",
    ],
    extras_require={
        "timm": ["timm>=1.0.9"],
        # monai: swap's tests recognise MONAI's AttentionBlock (1.5.1: the first with numpy 2 and torch >= 2.7)
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "psutil>=5.9", "timm>=1.0.9", "monai>=1.5.1"],
    },
    entry_points={"console_scripts": ["attnfast=attnfast.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
