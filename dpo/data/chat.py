"""Chat (conversational) preference rows, rendered to text with the tokenizer's chat template.

A chat row holds `chosen` and `rejected` as lists of messages: `{"role", "content"}` (the Hub's
and TRL's form) or ShareGPT `{"from", "value"}` turns (from: human/user, gpt/assistant/model,
system). A single message object counts as a list of one, a plain string as one assistant message
(one user message when it is the prompt), and OpenAI's `{"messages": [...]}` object as its messages.
A message's content is a string or a list of parts (`[{"type": "text", "text"|"value": ...}]`, the
OpenAI and LLaMA-Factory form), whose text parts are joined as chat templates join them (with no
separator); an image, audio or file part is refused. A row's `system` text, when its prompt does not
open with a system turn already, becomes the prompt's first (system) message. The prompt is
- the row's `prompt` (a string or messages) when it has one; when the prompt's messages also open
  chosen and rejected (as in HuggingFaceH4/ultrafeedback_binarized) they are cut from them; or
- the longest run of leading turns chosen and rejected share, shortened to end on a user or system
  turn, since the model generates after it.
Each response (the turns after the prompt) must end with an assistant turn.

Rendering follows the tokenizer's template: the prompt text is the prompt messages rendered with
the generation prompt; a response's text is what rendering prompt + response adds after it, less a
trailing EOS text, because the pipeline appends EOS to every response itself.

Rows of plain strings (`prompt`, `chosen`, `rejected`, optionally `system`) are used as written by
default, as the reference does, with the system text put before the prompt as an HH transcript
writes it (`system + "\n\nHuman: ..."`). With `model.string_prompts_as_chat=true` (for instruct
models) they are rendered like chat rows instead: the prompt as a user turn (after the system turn),
each response as an assistant turn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from dpo.errors import ConfigError, DataError

# The built-in `char` tokenizer's template: Anthropic HH transcripts, as the hh and toy data are
# written ("\n\nHuman: hi\n\nAssistant: hello"), with system text at the start and no EOS.
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\\n\\nAssistant: ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

CHAT_FIELDS = ("prompt", "chosen", "rejected")
# Message roles as the templates know them, keyed by what datasets write (ShareGPT says human and gpt,
# Gemini's data says model).
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "chatgpt": "assistant", "system": "system"}
VALID_ROLES = "user, assistant or system (ShareGPT: human, gpt or system)"
MESSAGE_EXAMPLE = '{"role": "user", "content": "..."} (or ShareGPT {"from": "human", "value": "..."})'
# The types of the parts of a message's content that hold text (OpenAI's chat and Responses forms).
TEXT_PART_TYPES = ("text", "input_text", "output_text")
# Where `load_tokenizer` records `model.string_prompts_as_chat` on the tokenizer, which the data pipeline receives.
STRINGS_AS_CHAT_ATTRIBUTE = "dpo_string_prompts_as_chat"

Message = dict[str, str]


@dataclass(frozen=True)
class Conversation:
    """A chat row split into the prompt's messages and each response's messages."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


def is_chat_row(row: dict) -> bool:
    """Whether any of prompt, chosen and rejected holds messages rather than plain text."""
    return any(isinstance(row.get(field), (list, dict)) for field in CHAT_FIELDS)


def set_string_prompts_as_chat(tokenizer, enabled: bool) -> None:
    """Have string rows rendered with `tokenizer`'s chat template (`model.string_prompts_as_chat`)."""
    setattr(tokenizer, STRINGS_AS_CHAT_ATTRIBUTE, bool(enabled))


def read_chat_template(value: str) -> str:
    """`model.chat_template`: the Jinja template in the file it names, or the template itself."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            return file.read()
    if "{{" not in value and "{%" not in value:
        raise ConfigError(f"model.chat_template={value} is neither a file nor a Jinja template (no {{{{ or {{% in "
                          "it); give the path of a template file, or the template itself")
    return value


def check_chat_template(tokenizer) -> None:
    """Render a two-turn conversation with the template, so that a broken one stops the run before any data."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                      tokenize=False)
    except Exception as error:  # Jinja syntax and template errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.chat_template cannot render a user and an assistant turn ({reason}); fix the "
                          "template") from None


def string_prompts_as_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, STRINGS_AS_CHAT_ATTRIBUTE, False)) if tokenizer is not None else False


def with_system_text(system: Optional[str], prompt: str) -> str:
    """A string prompt with the row's system text before it, as an HH transcript holds it.

    `"Be brief."` and `"\n\nHuman: hi\n\nAssistant:"` give `"Be brief.\n\nHuman: hi\n\nAssistant:"`
    (the char template's form); a prompt that does not open with a blank line gets one in between. An
    empty prompt stays empty, so that the pair is skipped as one with an empty prompt.
    """
    if not system or not system.strip() or not prompt.strip():
        return prompt
    return system + prompt if prompt.startswith("\n\n") else system + "\n\n" + prompt


def system_text(where: str, row: dict) -> Optional[str]:
    """The row's `system` text, or None when it has none (a missing or null column)."""
    system = row.get("system")
    if system is None or isinstance(system, str):
        return system
    raise DataError(f"{where} field 'system' is {type(system).__name__}, not text; give the system prompt as one "
                    "string")


# ---- messages ---------------------------------------------------------------------------------

def as_messages(where: str, field: str, value: Any, text_role: str) -> list[Message]:
    """A field's messages, normalised to `{"role", "content"}`; plain text becomes one `text_role` message."""
    if isinstance(value, str):
        return [{"role": text_role, "content": value}]
    if isinstance(value, dict) and isinstance(value.get("messages"), list) and value.get("role") is None \
            and value.get("from") is None:
        value = value["messages"]  # OpenAI's preference data: {"input": {"messages": [...], "tools": [...]}}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where} field '{field}' is {type(value).__name__}, not text or a list of messages; "
                        f"give messages like {MESSAGE_EXAMPLE}")
    return [as_message(where, field, number, message) for number, message in enumerate(value, start=1)]


def as_message(where: str, field: str, number: int, message: Any) -> Message:
    """One message as `{"role", "content"}`, from either the role/content or the ShareGPT from/value form."""
    if not isinstance(message, dict):
        raise DataError(f"{where} field '{field}' message {number} is {type(message).__name__}, not an object; "
                        f"give messages like {MESSAGE_EXAMPLE}")
    # A dataset mixing both forms stores every key in every message, the absent ones as None.
    keys = ("role", "content") if message.get("role") is not None or message.get("content") is not None \
        else ("from", "value")
    missing = [key for key in keys if message.get(key) is None]
    if missing:
        present = ", ".join(key for key, value in message.items() if value is not None) or "none"
        raise DataError(f"{where} field '{field}' message {number} has no '{missing[0]}' (its keys: {present}); "
                        f"give every message a role and content, like {MESSAGE_EXAMPLE}")
    role, content = message[keys[0]], message[keys[1]]
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DataError(f"{where} field '{field}' message {number} has the unknown role {role!r}; use "
                        f"{VALID_ROLES}")
    return {"role": ROLES[role.lower()], "content": content_text(f"{where} field '{field}' message {number}",
                                                                 content)}


def content_text(where: str, content: Any) -> str:
    """A message's content as one string: itself, or its text parts joined (chat templates join them so)."""
    if isinstance(content, str):
        return content
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, list):
        raise DataError(f"{where} has {type(content).__name__} content, not text; give each message's content as "
                        'one string or a list of parts like [{"type": "text", "text": "..."}]')
    texts = []
    for number, part in enumerate(parts, start=1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DataError(f"{where} has a content part {number} that is {type(part).__name__}, not an object; "
                            'give parts like {"type": "text", "text": "..."}')
        kind = part.get("type") or "text"
        if kind not in TEXT_PART_TYPES:
            raise DataError(f"{where} has a content part of type {kind!r}, but only text can be trained on here (the "
                            f"models are text-only); remove the row or its {kind} parts")
        text = part.get("text") if part.get("text") is not None else part.get("value")
        if not isinstance(text, str):
            raise DataError(f"{where} has a text part {number} without a 'text' (or 'value') string; give parts "
                            'like {"type": "text", "text": "..."}')
        texts.append(text)
    return "".join(texts)


# ---- prompt and responses ---------------------------------------------------------------------

def split_conversation(where: str, row: dict) -> Conversation:
    """The row's prompt messages and response messages (see the module docstring for the rules)."""
    chosen = as_messages(where, "chosen", row.get("chosen"), "assistant")
    rejected = as_messages(where, "rejected", row.get("rejected"), "assistant")
    prompt_value = row.get("prompt")
    if prompt_value is None:
        prompt = shared_prompt(chosen, rejected)
    elif isinstance(prompt_value, str) and not prompt_value.strip():
        prompt = []
    else:
        prompt = as_messages(where, "prompt", prompt_value, "user")
    conversation = Conversation(with_system_turn(system_text(where, row), prompt),
                                without_prefix(chosen, prompt), without_prefix(rejected, prompt))
    check_response(where, "chosen", conversation.chosen)
    check_response(where, "rejected", conversation.rejected)
    return conversation


def with_system_turn(system: Optional[str], prompt: list[Message]) -> list[Message]:
    """The prompt opened by a system turn of `system` text, unless it has one already (or is empty)."""
    if not system or not system.strip() or not prompt or prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def shared_prompt(chosen: list[Message], rejected: list[Message]) -> list[Message]:
    """The leading turns both conversations share, shortened to end on a user or system turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Identical trailing assistant turns are responses, not prompt: the model generates after the prompt.
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    return chosen[:shared]


def without_prefix(messages: list[Message], prefix: list[Message]) -> list[Message]:
    """`messages` less `prefix` when they start with it (responses that repeat the prompt's turns)."""
    return messages[len(prefix):] if prefix and messages[:len(prefix)] == prefix else messages


def check_response(where: str, field: str, response: list[Message]) -> None:
    if not response or response[-1]["role"] != "assistant":
        turns = ", ".join(message["role"] for message in response) or "none"
        raise DataError(f"{where}: the {field} response has no assistant turn at its end (its turns after the "
                        f"prompt: {turns}); end chosen and rejected with the assistant's reply")


def prompt_key(where: str, row: dict) -> str:
    """The prompt of a chat row as text that needs no tokenizer (to split a file's prompts by hash)."""
    return json.dumps(split_conversation(where, row).prompt, sort_keys=True, ensure_ascii=False)


def check_no_eos_text(where: str, conversation: Conversation, eos_text: Optional[str]) -> None:
    """Refuse EOS text inside a message: end tokens are the template's and the pipeline's to add.

    Checked on the messages, not the rendered text, because templates legitimately end turns with EOS.
    """
    if not eos_text:
        return
    for part, name in (("prompt", "prompt"), ("chosen", "chosen response"), ("rejected", "rejected response")):
        for message in getattr(conversation, part):
            if eos_text in message["content"]:
                raise DataError(f"{where}: the {name}'s {message['role']} turn contains the tokenizer's EOS text "
                                f"{eos_text!r}; remove it from the data (end tokens are added automatically)")


# ---- rendering --------------------------------------------------------------------------------

def strip_trailing_eos(text: str, eos_text: Optional[str]) -> str:
    """`text` less a final EOS text and the whitespace after it, which templates add after the last turn."""
    stripped = text.rstrip()
    if eos_text and stripped.endswith(eos_text):
        return stripped[: -len(eos_text)]
    return text


class ChatRenderer:
    """Renders the chat rows of one dataset to (prompt, chosen, rejected) texts with a tokenizer's chat template.

    The tokenizer is checked at the first chat row, so that data without chat rows needs no template.
    String rows are rendered too when the tokenizer says so (`model.string_prompts_as_chat`).
    """

    def __init__(self, tokenizer, dataset: str) -> None:
        self.tokenizer = tokenizer
        self.dataset = dataset

    @property
    def strings_as_chat(self) -> bool:
        return string_prompts_as_chat(self.tokenizer)

    def pair_texts(self, where: str, row: dict) -> tuple[str, str, str, bool]:
        """A checked pair or chat row as (prompt, chosen, rejected) texts, and whether the chat template wrote them.

        String rows are used as written, the system text before the prompt, unless `strings_as_chat`.
        """
        if is_chat_row(row) or self.strings_as_chat:
            return (*self.texts(where, row), True)
        return with_system_text(system_text(where, row), row["prompt"]), row["chosen"], row["rejected"], False

    def texts(self, where: str, row: dict) -> tuple[str, str, str]:
        self.check_template(where)
        conversation = split_conversation(where, row)
        check_no_eos_text(where, conversation, self.tokenizer.eos_token)
        if not conversation.prompt:
            return "", "", ""  # counted and skipped by clean_pairs as a pair with an empty prompt
        prompt_text = self.render(where, conversation.prompt, add_generation_prompt=True)
        chosen = self.response_text(where, conversation.prompt, conversation.chosen, prompt_text)
        rejected = self.response_text(where, conversation.prompt, conversation.rejected, prompt_text)
        return prompt_text, chosen, rejected

    def response_text(self, where: str, prompt: list[Message], response: list[Message], prompt_text: str) -> str:
        full_text = self.render(where, prompt + response, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise DataError(f"{where}: the chat template of tokenizer {self.tokenizer_name} renders the whole "
                            "conversation with a different start than the prompt alone, so the response cannot be "
                            "cut from it; choose a tokenizer whose template renders the prompt (with the generation "
                            "prompt) as the start of the whole conversation")
        return strip_trailing_eos(full_text[len(prompt_text):], self.tokenizer.eos_token)

    def render(self, where: str, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as error:  # a template may raise on turn order, and Jinja errors come in many types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"{where}: the chat template of tokenizer {self.tokenizer_name} cannot render this "
                            f"conversation ({reason}); fix the row's turns or choose another tokenizer") from None

    def check_template(self, where: str) -> None:
        if self.tokenizer is None:
            raise DataError(f"dataset {self.dataset} holds chat rows (lists of messages, e.g. {where}), which "
                            "a tokenizer's chat template renders to text, but no tokenizer was given; load it with "
                            "a tokenizer that has a chat template")
        if not getattr(self.tokenizer, "chat_template", None):
            what = ("string rows to render as chat (model.string_prompts_as_chat=true" if self.strings_as_chat
                    else "chat rows (lists of messages")
            raise DataError(f"dataset {self.dataset} holds {what}, e.g. {where}), but "
                            f"tokenizer {self.tokenizer_name} has no chat template to render them; choose a "
                            "tokenizer that has one (e.g. an -Instruct or -chat model's, or the built-in char), "
                            "or set model.chat_template to a template file or string")

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
