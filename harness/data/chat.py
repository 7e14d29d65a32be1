"""Prompts and responses as the model reads them: the tokenizer's chat template, or the
reference dialogue template. The one rule for training, evaluation sampling, generate_samples.py,
evaluate.py, the reward model, PPO rollouts and the server, so a prompt is never formatted two
ways:

    a tokenizer WITH a chat template   the prompt text (canonical records keep the reference
                                       "\\n\\nHuman: ...\\n\\nAssistant:" format) is parsed back
                                       into messages (dialogue.to_messages) and rendered with
                                       add_generation_prompt (continue_final_message for a
                                       prefill such as CoH's phrase); a response is its text
                                       (without the format's leading space) + the template's
                                       end-of-turn token
    a tokenizer WITHOUT one            the text as it is, a response + EOS (the reference code)

`chat_template=auto|none|PATH` decides at load time which of the two a tokenizer is
(`apply_option`): auto keeps the tokenizer's own template (pythia / llama2 base models have
none, so they behave as before), none removes it, PATH installs a Jinja file. Why parse the text
instead of carrying messages in the records: every loader, the prefs files, sample files and
judges already speak the reference format, and the parse is exact for the texts they write
(the round trip is tested), so no record format changes and a run without a template is
byte-for-byte the reference behaviour.

Token ids never get special tokens added by the tokenizer (no doubled BOS: a template that
wants a BOS writes it). Message texts must not contain special-token strings (they would be
read as control tokens): an example that does is refused, naming it.
"""

import logging
import os
import weakref
from dataclasses import dataclass

from harness.data.dialogue import messages_prompt, to_messages
from harness.data.tokens import token_ids, truncate

logger = logging.getLogger(__name__)

AUTO, NONE = "auto", "none"
_PROBE_USER, _PROBE_ANSWER = "Hello there", "Plugh xyzzy"
_LOGGED: set = set()


# ---------------------------------------------------------------------- the option
def check_option(value, key: str = "chat_template"):
    """auto, none or an existing file; refused before any model loads."""
    if value in (AUTO, NONE):
        return
    if not isinstance(value, str) or not os.path.isfile(os.path.expanduser(value)):
        raise ValueError(f"{key}={value!r}: use auto (the tokenizer's own template, else the "
                         "reference dialogue template), none (always the reference template) "
                         "or the path of a Jinja chat template file (no such file)")


def apply_option(tokenizer, option: str = AUTO, source: str = "the model"):
    """Give `tokenizer` the chat template `option` asks for (in place; returns it)."""
    check_option(option)
    if option == NONE:
        tokenizer.chat_template = None
    elif option == AUTO:
        if not uses_chat_template(tokenizer) and source not in _LOGGED:
            _LOGGED.add(source)
            logger.info("%s has no chat template: prompts use the reference dialogue template "
                        "(chat_template=auto)", source)
    else:
        path = os.path.expanduser(option)
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        try:
            _pieces(tokenizer)
        except Exception as e:  # noqa: BLE001 - jinja syntax / undefined names / no answer slot
            tokenizer.chat_template = None
            raise ValueError(f"chat_template={option!r}: the template does not render a "
                             f"conversation ({type(e).__name__}: {e})") from None
    return tokenizer


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------- rendering text
def _render(tokenizer, messages, generation: bool = False, prefill: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation,
                                         continue_final_message=prefill)


def render_messages(tokenizer, messages: list[dict]) -> str:
    """OpenAI-style messages as the text the model continues (a final assistant message is a
    prefill the answer continues)."""
    if not uses_chat_template(tokenizer):
        return messages_prompt(messages)
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    return _render(tokenizer, messages, generation=not prefill, prefill=prefill)


def render_prompt(tokenizer, prompt: str) -> str:
    """A canonical prompt as the text the model continues."""
    return render_messages(tokenizer, to_messages(prompt)) if uses_chat_template(tokenizer) \
        else prompt


@dataclass(frozen=True)
class TemplatePieces:
    end_ids: tuple[int, ...]    # what ends an assistant turn, through its end-of-turn token
    separator: str              # text between one assistant turn's end and the next one's text
    specials: tuple[str, ...]   # special-token strings no message text may contain


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _pieces(tokenizer) -> TemplatePieces:
    """What the template puts around an assistant answer, read off a rendered probe."""
    cached = _CACHE.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    user = [{"role": "user", "content": _PROBE_USER}]
    full = _render(tokenizer, user + [{"role": "assistant", "content": _PROBE_ANSWER}])
    if _PROBE_ANSWER not in full:
        raise ValueError("the rendered conversation does not contain the assistant's text")
    after = full[full.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    specials = tuple(sorted(_special_strings(tokenizer), key=len, reverse=True))
    hits = [(after.find(s), s) for s in specials if s in after]
    if hits:  # the answer ends at the template's first special token after it
        pos, token = min(hits)
        end_ids, trailing = tuple(_ids(tokenizer, after[:pos + len(token)])), after[pos + len(token):]
    else:  # a template without an end-of-turn token: the answer ends with EOS
        end_ids, trailing = (tokenizer.eos_token_id,), after
    plain, generating = _render(tokenizer, user), _render(tokenizer, user, generation=True)
    header = generating[len(plain):] if generating.startswith(plain) else ""
    pieces = TemplatePieces(end_ids, trailing + header, specials)
    _CACHE[tokenizer] = (tokenizer.chat_template, pieces)
    return pieces


def _special_strings(tokenizer) -> set[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []))
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(added.content)
    return {s for s in found if s}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_text(tokenizer, text: str, what: str, uid: str):
    """Refuse message text that holds a special-token string of the template's tokenizer."""
    for special in _pieces(tokenizer).specials:
        if special in text:
            raise ValueError(f"example {uid}: {what} contains the special token {special!r} "
                             f"(it would be read as a control token): {text[:80]!r}")


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an answer under the chat template (None without one): generation
    stops there as at EOS."""
    return _pieces(tokenizer).end_ids[-1] if uses_chat_template(tokenizer) else None


# ---------------------------------------------------------------------- token ids
def encode_prompt(tokenizer, prompt: str, uid: str = "prompt", mode: str = "keep_start",
                  max_tokens: int | None = None) -> list[int]:
    """Token ids of a canonical prompt, cut to max_tokens (None: never). Without a chat
    template: the text's ids, cut by `mode` (keep_start / keep_end), as the reference code.
    With one: whole turns go first (the oldest exchanges; the system message and the last user
    turn stay), then the last user message's text is cut by `mode`, so the template's
    structure (its BOS, headers and generation prompt) is always whole."""
    if not uses_chat_template(tokenizer):
        ids = token_ids(tokenizer, prompt, "prompt", uid)
        return ids if max_tokens is None else truncate(ids, mode, max_tokens)
    messages = to_messages(prompt)
    for m in messages:
        check_text(tokenizer, m["content"], f"{m['role']} text", uid)
    ids = _ids(tokenizer, render_messages(tokenizer, messages))
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    return _fit_turns(tokenizer, messages, mode, max_tokens, uid)


def _fit_turns(tokenizer, messages, mode, max_tokens, uid) -> list[int]:
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    last = users[-1] if users else 0
    for start in users[1:]:  # drop whole exchanges, oldest first
        ids = _ids(tokenizer, render_messages(tokenizer, system + turns[start:]))
        if len(ids) <= max_tokens:
            return ids
    kept = system + turns[last:]
    at = len(system)
    content = _ids(tokenizer, kept[at]["content"])
    room = max_tokens - len(_ids(tokenizer, render_messages(
        tokenizer, kept[:at] + [{**kept[at], "content": ""}] + kept[at + 1:])))
    while room > 0:
        text = tokenizer.decode(truncate(content, mode, room))
        ids = _ids(tokenizer, render_messages(
            tokenizer, kept[:at] + [{**kept[at], "content": text}] + kept[at + 1:]))
        if len(ids) <= max_tokens:
            return ids
        room -= len(ids) - max_tokens  # the cut text re-tokenised a little longer
    raise ValueError(f"example {uid}: the chat template around the last user message alone "
                     f"takes more than {max_tokens} tokens (max_prompt_length): raise it")


def encode_response(tokenizer, response: str, uid: str = "response",
                    what: str = "response") -> list[int]:
    """Token ids of a response ending with exactly one end-of-turn token (EOS without a chat
    template), which is trained: the model learns to stop."""
    if not uses_chat_template(tokenizer):
        return token_ids(tokenizer, response, what, uid) + [tokenizer.eos_token_id]
    text = response[1:] if response.startswith(" ") else response  # the format's space
    check_text(tokenizer, text, what, uid)
    return _ids(tokenizer, text) + list(_pieces(tokenizer).end_ids)


def encode_block(tokenizer, phrase: str, answer: str | None, uid: str,
                 first: bool) -> tuple[list[int], list[int]]:
    """(phrase ids, answer ids ending in end-of-turn) of one feedback block of a CoH chain,
    after the prompt (`first`) or after an earlier answer. With a chat template each block is
    an assistant turn that starts with its phrase: later blocks open a new turn first. answer
    None: the phrase alone (the inference prompt's prefill)."""
    if not uses_chat_template(tokenizer):
        phrase_ids = token_ids(tokenizer, phrase, "feedback phrase", uid) if phrase else []
        return phrase_ids, [] if answer is None else \
            token_ids(tokenizer, answer, "answer", uid) + [tokenizer.eos_token_id]
    pieces = _pieces(tokenizer)
    text = phrase.lstrip(" ")
    check_text(tokenizer, text, "feedback phrase", uid)
    phrase_ids = ([] if first else _ids(tokenizer, pieces.separator)) + \
        (_ids(tokenizer, text) if text else [])
    if answer is None:
        return phrase_ids, []
    if not text:  # no phrase: the answer starts the turn, as a plain response
        return phrase_ids, encode_response(tokenizer, answer, uid, "answer")
    check_text(tokenizer, answer, "answer", uid)
    return phrase_ids, _ids(tokenizer, answer) + list(pieces.end_ids)
