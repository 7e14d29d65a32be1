"""Chain of Hindsight's feedback phrases: templates such as " A helpful answer:{answer}" parsed
into (phrase, slot) blocks, the phrase sets of loss.feedback_sets (and loss.feedback_sets_file),
and loss.score_buckets (graded feedback: a phrase per score range)."""

import string

import yaml
from omegaconf import OmegaConf

Blocks = tuple[tuple[str, str], ...]  # ((feedback phrase, slot or answer text), ...)


# ------------------------------------------------------------------ feedback phrase sets
def parse_template(text, slots: tuple[str, ...], where: str) -> Blocks:
    """A template -> ((phrase, slot), ...): the literal text before each slot is its phrase.
    Each slot must occur once and the template must end with one (EOS follows an answer)."""
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a template string, got {text!r}")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ValueError(f"{where} = {text!r} is not a valid template ({err})") from None
    blocks, trailing = [], ""
    for literal, field, _, _ in parts:
        if field is None:
            trailing = literal
        elif field not in slots or field in {slot for _, slot in blocks}:
            raise ValueError(f"{where} = {text!r}: slot {{{field}}} is unknown or repeated; "
                             f"use each of {', '.join('{' + s + '}' for s in slots)} once")
        else:
            blocks.append((literal, field))
    missing = [s for s in slots if s not in {slot for _, slot in blocks}]
    if missing:
        raise ValueError(f"{where} = {text!r} has no answer slot {{{missing[0]}}}; write e.g. "
                         f"' A helpful answer:{{{missing[0]}}}'")
    if trailing:
        raise ValueError(f"{where} = {text!r} has text after its last slot; end the template "
                         "with the answer slot (the answer's EOS follows it)")
    return tuple(blocks)


def feedback_sets(loss_cfg) -> dict:
    """loss.feedback_sets, plus the sets of the YAML file loss.feedback_sets_file (which win)."""
    sets = OmegaConf.to_container(loss_cfg.feedback_sets, resolve=True) or {}
    path = loss_cfg.get("feedback_sets_file")
    if path:
        try:
            extra = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except (OSError, ValueError, yaml.YAMLError) as err:  # missing file, YAML syntax error
            raise ValueError(f"loss.feedback_sets_file={path!r}: {err}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"loss.feedback_sets_file={path!r} must map set names to sets")
        sets.update(extra)
    return sets


def parse_phrase_set(name: str, spec) -> tuple[tuple[dict, ...], tuple[Blocks, ...]]:
    """(wording pairs {positive, negative: Blocks}, comparison templates) of one set."""
    where = f"loss.feedback_sets.{name}"
    if not isinstance(spec, dict) or not spec.get("pairs"):
        raise ValueError(f"{where} needs a non-empty 'pairs' list of {{positive, negative}} "
                         "templates (optional: 'comparison' templates with {better} and {worse})")
    pairs = []
    for i, pair in enumerate(spec["pairs"]):
        if not isinstance(pair, dict) or set(pair) != {"positive", "negative"}:
            raise ValueError(f"{where}.pairs[{i}] must have exactly the keys positive, negative")
        pairs.append({k: parse_template(pair[k], ("answer",), f"{where}.pairs[{i}].{k}")
                      for k in ("positive", "negative")})
    comparisons = tuple(parse_template(t, ("better", "worse"), f"{where}.comparison[{i}]")
                        for i, t in enumerate(spec.get("comparison") or ()))
    return tuple(pairs), comparisons


def score_buckets(spec) -> tuple[tuple[float | None, str], ...]:
    """loss.score_buckets -> ((lowest score, phrase), ...), checked: scores descending, the
    last one null (a phrase for every score), each template a phrase then {answer}."""
    if spec is None:
        return ()
    where = "loss.score_buckets"
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"{where} must be a list of [lowest score, template] (or null)")
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{where}[{i}]={item!r} must be [lowest score, template]")
        low, template = item
        last = i == len(spec) - 1
        if (low is None) != last or not (low is None or isinstance(low, (int, float))):
            raise ValueError(f"{where}[{i}]: the lowest scores must be numbers, and null exactly "
                             "in the last bucket (it takes every score below the others)")
        if out and low is not None and low >= out[-1][0]:
            raise ValueError(f"{where}[{i}]: buckets go from the highest score down")
        blocks = parse_template(template, ("answer",), f"{where}[{i}]")
        out.append((None if low is None else float(low), blocks[0][0]))
    return tuple(out)


def bucket_phrase(buckets, score: float) -> str:
    return next(phrase for low, phrase in buckets if low is None or score >= low)
