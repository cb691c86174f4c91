from setuptools import find_packages, setup

setup(
    name="lav2",
    version="0.1.0",
    description="Download, fine-tune, merge and chat with LLaMA-Adapter V2 on one GPU",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lav2", "lav2.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "open_clip_torch>=2.24",
        "sentencepiece",
        "safetensors",
        "huggingface_hub>=0.23",
        "click>=8.1",
        "rich>=13",
        "Pillow",
        "PyYAML",
        "matplotlib",
        "fastapi>=0.110",  # lav2 serve (a core command, so no extra: the two are small and pure Python)
        "uvicorn>=0.29",
    ],
    extras_require={
        "8bit": ["bitsandbytes>=0.43"],
        "ocr": ["pytesseract"],
        "test": ["pytest", "transformers>=4.40", "bitsandbytes>=0.43", "pytesseract", "openai>=1.40"],
    },
    entry_points={"console_scripts": ["lav2 = lav2.cli:main"]},
)
