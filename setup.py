"""Package metadata for megatron_ru: dependencies and extras. The entry points are scripts run from the checkout (pretrain_gpt.py, generate.py, tools/*.py), not console scripts."""
from setuptools import find_packages, setup

setup(
    name="megatron_ru",
    version="0.1.0",
    description="Pretrain and sample ruGPT-3 / T-lite models with Megatron tensor parallelism and "
                "DeepSpeed, on CPU or GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ru", "megatron_ru.*"]),
    package_data={"megatron_ru.evaluation": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.14",
        "mpi4py>=3.1",
        "mpich",
        "sentencepiece",
        "numpy",
        "regex",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.40", "safetensors", "tokenizers", "fastapi", "uvicorn",
                 "openai>=1.0", "httpx", "lm-eval>=0.4.5", "megatron-core>=0.16", "peft>=0.10",
                 "jinja2"],
        "megatron": ["megatron-core>=0.16"],  # only tests compare against it; readers need no Megatron
        "hf": ["transformers>=4.40", "safetensors", "tokenizers"],
        "serve": ["fastapi>=0.100", "uvicorn>=0.30", "jinja2"],  # jinja2: chat templates
        "finetune": ["jinja2", "peft>=0.10"],  # chat templates; PEFT adapter export is read by peft
        "eval": ["lm-eval>=0.4.5"],  # tools/run_lm_eval.py, --eval-tasks
    },
    license="Apache-2.0",
)
