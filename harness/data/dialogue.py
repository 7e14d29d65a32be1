"""The reference dialogue template, `\\n\\nHuman: <text>\\n\\nAssistant:`, and its inverse.

Anthropic HH and the DPO reference code write every prompt this way, with responses starting
with a space; the loaders, the toy task, the judges, the sample files and the server render and
parse prompts only through these functions.
"""

import re

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def human_prompt(text: str) -> str:
    """One human turn, ready for the assistant's answer."""
    return HUMAN + text + ASSISTANT


def dialogue(exchanges: list[tuple[str, str]], final_human: str) -> str:
    """Earlier (human, assistant) exchanges, then the final human turn ready for the answer."""
    return "".join(f"{HUMAN}{h}{ASSISTANT} {a}" for h, a in exchanges) + human_prompt(final_human)


def messages_prompt(messages: list[dict]) -> str:
    """OpenAI-style messages in the dialogue format (system text first, then the turns), ready
    for the assistant's answer: the format for models without a chat template."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                    for m in messages if m["role"] != "system")
    return system + turns + ASSISTANT


def to_messages(text: str) -> list[dict]:
    """The inverse of `dialogue` / `messages_prompt`: a prompt in the dialogue format as
    OpenAI-style messages. Text before the first human turn is the system message; the text of
    each turn loses the one space the format puts after "Assistant:". A prompt that ends in
    "\n\nAssistant:" asks for a new answer; one that ends in an assistant turn with text (a
    prefill, such as CoH's feedback phrase) gets that text as its last, unfinished message.
    Text that is not in the dialogue format is one user message."""
    parts = re.split(r"\n\n(Human|Assistant):", text)
    if len(parts) == 1:
        return [{"role": "user", "content": text}]
    messages = [{"role": "system", "content": parts[0]}] if parts[0] else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant",
                         "content": content[1:] if content.startswith(" ") else content})
    if messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # the answer to come
    return messages


def instruction_of(prompt: str) -> str:
    """The human text of a one-turn prompt; any other prompt is its own instruction."""
    if prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT):
        return prompt[len(HUMAN):-len(ASSISTANT)]
    return prompt


def extract_prompt(dialogue_text: str, where: str) -> str:
    """Everything up to and including the last '\\n\\nAssistant:' (the reference's
    extract_anthropic_prompt): the prompt of a full HH transcript."""
    idx = dialogue_text.rfind(ASSISTANT)
    if idx == -1:
        raise ValueError(f"{where}: dialogue does not contain {ASSISTANT!r}")
    return dialogue_text[: idx + len(ASSISTANT)]


def last_human_turn(prompt: str) -> str:
    """The text of the last human turn of a (multi-turn or chained) prompt."""
    return prompt.rsplit(HUMAN.strip(), 1)[-1].split(ASSISTANT.strip(), 1)[0]


def first_answer(completion: str) -> str:
    """A completion cut where the model starts a new dialogue turn."""
    cuts = [i for i in (completion.find(HUMAN.strip()), completion.find(ASSISTANT.strip()))
            if i != -1]
    return completion[:min(cuts)] if cuts else completion
