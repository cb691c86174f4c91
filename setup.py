from pathlib import Path

from setuptools import find_packages, setup

# Every third-party module lav2 imports is declared here, and tests/test_imports.py checks it: module-level imports
# in install_requires, lazy ones (inside a function) there or in an extra, test-only ones in "test". lav2.download
# calls httpx2 and huggingface_hub's HTTP helpers directly, so both stay on the major they were written for
# (huggingface_hub 2.0 is its first release built on httpx2).
setup(
    name="lav2",
    version="0.1.0",
    description="Download, fine-tune, merge and chat with LLaMA-Adapter V2 on one GPU",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["lav2", "lav2.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "open_clip_torch>=2.24",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "huggingface_hub>=2.0,<3",
        "httpx2>=2.0,<3",
        "filelock>=3.10",
        "click>=8.1",
        "rich>=13",
        "Pillow>=10",
        "PyYAML>=6",
        "matplotlib>=3.7",
        "pycocoevalcap>=1.2",  # COCO caption metrics (BLEU, METEOR, ROUGE_L, CIDEr) as papers report them
        # lav2 serve, a core command (no extra): FastAPI and uvicorn are small and pure Python, and serve imports
        # pydantic and starlette (FastAPI's own foundations) by name too
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.6",
        "starlette>=0.37",
    ],
    extras_require={
        "8bit": ["bitsandbytes>=0.43"],
        "ocr": ["pytesseract>=0.3.10"],
        "test": ["pytest>=8", "transformers>=4.40", "bitsandbytes>=0.43", "pytesseract>=0.3.10", "openai>=1.40"],
    },
    entry_points={"console_scripts": ["lav2 = lav2.cli:main"]},
)
