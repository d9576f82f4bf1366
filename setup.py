"""jax_introspect: concept-injection introspection experiments on Llama-3.1 in JAX/Flax."""
from setuptools import find_packages, setup

# Hosted judges (grader "api:anthropic:<model>" / "api:openai:<model>"): the official SDKs.
API_EXTRA = ["anthropic>=2", "openai>=3"]
# The jax the project is tested with. Its `tpu` extra pins the libtpu that runs on TPU VMs and, on a
# CPU host, compiles for a TPU slice without one (launch.tpu.plan, tests/test_tpu_compile.py).
JAX_VERSION = "0.10.2"
TPU_EXTRA = [f"jax[tpu]=={JAX_VERSION}"]
# Runs as Inspect logs and a static viewer of them (jax_introspect.experiment.inspect_log). Pinned: the
# viewer bundle is made to open from disk by adapting the page this version's `inspect view bundle` writes.
INSPECT_EXTRA = ["inspect-ai==0.3.285"]

setup(
    name="jax_introspect",
    version="0.1.0",
    description="Concept-injection introspection experiments (Lindsey 2026) on Llama-3.1 in JAX/Flax",
    packages=find_packages(include=["jax_introspect", "jax_introspect.*", "launch", "launch.*"]),
    package_data={"jax_introspect.experiment.protocols": ["data/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "orbax-checkpoint>=0.12",
        "optax",
        "numpy",
        "absl-py",
        "safetensors",
        "gguf>=0.19",
        "tiktoken",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "scipy",
    ],
    extras_require={
        "api": API_EXTRA,
        "tpu": TPU_EXTRA,
        "inspect": INSPECT_EXTRA,
        # torch is pinned to the CPU build that ships on this machine image; an unpinned torch
        # pulls a multi-GB CUDA build. torch + transformers serve parity tests only.
        "test": [
            "pytest",
            "pytest-xdist>=3.8",  # launch/run_tests.sh: --no-loadscope-reorder (3.8.0)
            "psutil",
            "torch==2.13.0",
            "transformers>=5",
            "accelerate",
            "pillow",
            "peft==0.21.2",  # tests/test_adapters.py: the LoRA reference
            "compressed-tensors",  # tests/test_fp8.py: transformers' own FP8-dynamic path as a second reference
            "nnsight==0.8.1",  # benchmarks/sweep_engine.py's nnsight arm and its check, tests/test_nnsight_arm.py
            *API_EXTRA,  # tests/test_grading.py runs the API judges on the SDKs
            *TPU_EXTRA,  # tests/test_tpu_compile.py, tests/test_tpu_plan.py compile for TPU slices
            *INSPECT_EXTRA,  # tests/test_inspect_log.py, test_inspect_viewer.py: the logs and their viewer
        ],
    },
)
