"""Write an alpaca_eval annotator config that uses one of our judge templates and any
OpenAI-compatible endpoint (its base URL goes in OPENAI_API_BASE when alpaca_eval runs).

    python scripts/alpaca_eval_config.py --template toy --judge-model judge --out-dir CFG
    OPENAI_API_BASE=http://127.0.0.1:8000/v1 alpaca_eval --annotators_config CFG/our_judge ...

The prompt is the template's system and user messages in alpaca_eval's chat markup, with our
{output_a}/{output_b} as its {output_1}/{output_2}; the verdict is the answer's first letter.
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.feedback.judges import load_template  # noqa: E402


def write_config(template_name: str, judge_model: str, out_dir: str, name: str = "our_judge",
                 max_tokens: int = 8) -> Path:
    template = load_template(template_name)
    for text in (template.system, template.user):
        if re.search(r"\{(?!instruction\}|output_a\}|output_b\})", text):
            raise ValueError(f"{template.source}: alpaca_eval formats the prompt with str.format; "
                             "remove braces other than the placeholders")
    user = template.user.replace("{output_a}", "{output_1}").replace("{output_b}", "{output_2}")
    prompt = (f"<|im_start|>system\n{template.system}\n<|im_end|>\n" if template.system else "") + \
        f"<|im_start|>user\n{user}\n<|im_end|>\n"
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(prompt, encoding="utf-8")
    a, b = (re.escape(x) for x in template.answers)
    lines = [f"{name}:", f'  prompt_template: "{name}/prompt.txt"',
             '  fn_completions: "openai_completions"', "  completions_kwargs:",
             f'    model_name: "{judge_model}"', f"    max_tokens: {max_tokens}",
             "    temperature: 0", "  completion_parser_kwargs:", "    outputs_to_match:",
             f"      1: '^\\W*{a}(?!\\w)'", f"      2: '^\\W*{b}(?!\\w)'", "  batch_size: 1"]
    (folder / "configs.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--template", default="default")
    p.add_argument("--judge-model", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", default="our_judge")
    args = p.parse_args(argv)
    print(write_config(args.template, args.judge_model, args.out_dir, args.name))


if __name__ == "__main__":
    main()
