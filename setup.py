from setuptools import setup

setup(
    name="accumopt",
    version="0.1.0",
    description="Gradient accumulation inside the optimizer: exact, bufferless, Triton-fused",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ sits beside accumopt/ in the repository and installs as accumopt.kernels,
    # never as a top-level `kernels` (a name PyPI already uses).
    packages=["accumopt", "accumopt.functional", "accumopt.kernels"],
    package_dir={"accumopt": "accumopt", "accumopt.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    # numpy: Triton's interpreter (TRITON_INTERPRET=1), which the CPU tests run the kernels in.
    # bench: the plots, and torch-optimi, the peer the suites compare against.
    # integrations: the training frameworks the integration tests run accumopt in.
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "numpy", "expecttest"],
                    "bench": ["matplotlib", "torch-optimi"],
                    "integrations": ["transformers", "accelerate", "lightning"]},
)
