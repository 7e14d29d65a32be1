"""Export a policy.pt checkpoint as a Hugging Face model dir (safetensors + tokenizer).

    python scripts/export_hf.py RUN_DIR/LATEST/policy.pt OUT_DIR [--model NAME_OR_PATH]
    python scripts/export_hf.py RUN_DIR OUT_DIR           # a run dir (its LATEST) or checkpoint dir

The base model comes from the run's config.yaml (two folders up) unless --model is given.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from harness.checkpoints import find_policy  # noqa: E402
from harness.models.modeling import load_model, load_tokenizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a policy.pt ({step_idx, state, metrics}), a "
                        "checkpoint dir or a run dir (its LATEST)")
    parser.add_argument("out_dir")
    parser.add_argument("--model", help="base model dir or hub id (default: from the run's config)")
    parser.add_argument("--dtype", default=None, help="dtype to save in (default: policy_dtype)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir):
        parser.error(f"{args.out_dir} already exists; choose a new output dir")
    if os.path.isdir(args.checkpoint):
        found = find_policy(args.checkpoint)
        if found is None:
            parser.error(f"{args.checkpoint} holds no policy.pt nor LATEST/policy.pt")
        args.checkpoint = found
    model_cfg = None
    run_config = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
    if run_config.exists():
        model_cfg = OmegaConf.load(run_config).model
    if args.model is None and model_cfg is None:
        parser.error(f"no run config at {run_config}; pass --model NAME_OR_PATH")
    name = args.model or model_cfg.name_or_path
    tokenizer_name = args.model or model_cfg.tokenizer_name_or_path or name
    dtype = args.dtype or (model_cfg.policy_dtype if model_cfg else "float32")
    model = load_model(name, dtype, archive=args.checkpoint)
    tmp = f"{args.out_dir.rstrip('/')}.tmp-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(tokenizer_name).save_pretrained(tmp)
    os.replace(tmp, args.out_dir)
    print(f"exported {args.checkpoint} -> {args.out_dir}")


if __name__ == "__main__":
    main()
