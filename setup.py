from setuptools import find_packages, setup

setup(
    name="cas",
    version="0.1.0",
    description="Cartridges and Cartridges at Scale: trained KV caches for document collections, in JAX",
    packages=find_packages(include=["cas", "cas.*", "configs", "launch"]),
    package_data={"cas.data": ["texts/prose.jsonl.gz", "texts/README.md"]},  # data.kind="prose"
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "transformers>=4.50",
        "tensorflow-datasets",
        "ml-collections",
        "absl-py",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",
        "sentencepiece",
        "jinja2",
        "numpy",
        "tqdm",
        "tensorboardX",
        "array-record",
        "importlib_resources",
        "bm25s>=0.3.16",  # tfds 4.9 imports it on Python 3.11 without declaring it
        "matplotlib",  # evaluation plots (Agg canvas)
        "fsspec",  # cartridge stores on object storage (gs://, s3:// with gcsfs / s3fs), cas.rotation.objfs
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "hypothesis", "accelerate",
                 "fastapi", "uvicorn", "openai", "peft>=0.19"],  # serve tests; PEFT CARTRIDGE interop tests
        "serve": ["fastapi", "uvicorn"],  # python -m launch.serve (cas/serve/api.py)
        "gpu": ["jax[cuda12]"],
    },
)
