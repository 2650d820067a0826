"""Prompts as text and as tokens: the paper's template, chat templates, and how prompt and answer are tokenised.

Training data, generation, serving and evaluation all turn text into prompt tokens here, so the same text gives
the same tokens everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from bitune.errors import BituneInputError

PLAIN_TEMPLATE = "Question: {prompt}\n\nAnswer:"

# Well-known chat templates by name, character for character as the models' tokenizers ship them
# (`chat_template` in their tokenizer_config.json), for tokenizers that have none or another one.
CHAT_TEMPLATES = {
    # teknium/OpenHermes-2.5, Qwen, SmolLM2-Instruct (which adds a default system turn when there is none)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta, TinyLlama-1.1B-Chat
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
        "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + "
        "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + "
        "message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf (the system turn goes into the first user turn, inside <<SYS>>)
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
        "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) "
        "%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # google/gemma-7b-it (no system turn)
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
    ),
}


def chat_template_text(chat_template: str) -> str:
    """The Jinja text of a chat template given by name (`CHAT_TEMPLATES`) or as Jinja text itself.

    Example:
        >>> chat_template_text("chatml").startswith("{% for message in messages %}")
        True
    """
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if isinstance(chat_template, str) and ("{{" in chat_template or "{%" in chat_template):
        return chat_template
    raise BituneInputError(
        f"chat_template {chat_template!r} is unknown; use one of {', '.join(CHAT_TEMPLATES)} or a Jinja "
        "template (text with {{ ... }} / {% ... %}, as in a tokenizer_config.json)"
    )


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    """Give `tokenizer` the chat template `chat_template` (a name or Jinja text; None: keep its own).

    A checkpoint saved with this tokenizer keeps the template, so generation and chat with template "chat"
    (and lm-eval's --apply_chat_template) render prompts as training did; the tokenizer's files on disk are
    not touched.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(base)  # a fresh one, since the next line changes it
        >>> use_chat_template(tokenizer, "zephyr")
        >>> render_chat([{"role": "user", "content": "Hi"}], tokenizer)
        '<|user|>\\nHi</s>\\n<|assistant|>\\n'
    """
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)


def render_chat(
    turns: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None
) -> str:
    """The prompt text of a conversation (`[{"role": ..., "content": ...}, ...]`), ready for the assistant's
    answer, in `chat_template` (a name in `CHAT_TEMPLATES` or Jinja text) or else the tokenizer's own template.

    Example:
        >>> render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        ...             tokenizer, "chatml")
        '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

    Raises:
        BituneInputError: no template (none given, none in the tokenizer), or the template rejects the turns.
    """
    from jinja2 import TemplateError  # chat templates need jinja2 (transformers imports it the same way)

    template = chat_template_text(chat_template) if chat_template is not None else None
    if tokenizer is None or not (template or tokenizer.chat_template):
        raise BituneInputError(
            "template chat: the tokenizer has no chat template; set chat_template (a name: "
            f"{', '.join(CHAT_TEMPLATES)}; or Jinja text), or use template plain"
        )
    try:
        return tokenizer.apply_chat_template(
            list(turns), chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as error:
        raise BituneInputError(f"the chat template rejects this conversation ({error})") from None


def render_prompt(text: str, template: str, tokenizer=None, chat_template: str | None = None) -> str:
    """Put a user message into a template: "plain" (the paper's), "chat" (`chat_template`, a name in
    `CHAT_TEMPLATES` or Jinja text; by default the tokenizer's own), "none", or "...{prompt}...".

    Example:
        >>> render_prompt("Hi", "plain")
        'Question: Hi\\n\\nAnswer:'
    """
    if template == "none":
        return text
    if template == "chat":
        return render_chat([{"role": "user", "content": text}], tokenizer, chat_template)
    if template == "plain":
        template = PLAIN_TEMPLATE
    if "{prompt}" not in template:
        raise BituneInputError(
            f"template {template!r}: use plain, chat, none, or a text containing {{prompt}}"
        )
    return template.replace("{prompt}", text)


def split_answers(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], prompt_ids: list[list[int]], answers: list[str]
) -> list[list[int]]:
    """Each answer's tokens as they follow its prompt: the tail of `prompt + answer`'s tokens.

    As the authors' code splits them (and lm-eval, for prompts that do not end in whitespace, whose trailing
    spaces it moves to the answer). Encoded alone, " Paris" gets a SentencePiece tokenizer's dummy prefix
    (Llama-2: an extra lone "▁" before "▁Paris") that the answer never has after a prompt. Where the whole
    text's tokens do not start with the prompt's (a merge across the boundary, e.g. after a prompt ending in a
    space), the answer is encoded alone, so that training and generation see the same prompt tokens.
    """
    wholes = encode_prompts(tokenizer, [prompt + answer for prompt, answer in zip(prompts, answers)])
    split = [
        whole[len(prompt) :] if whole[: len(prompt)] == prompt else None
        for prompt, whole in zip(prompt_ids, wholes)
    ]
    unsplit = [index for index, ids in enumerate(split) if ids is None]
    if unsplit:
        alone = tokenizer([answers[index] for index in unsplit], **_NO_SPECIAL_TOKENS)["input_ids"]
        for index, ids in zip(unsplit, alone):
            split[index] = ids
    return split


# Batched calls let a fast tokenizer work in parallel.
_NO_SPECIAL_TOKENS = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, as the tokenizer itself encodes them (the same for training, generation,
    serving and evaluation).

    The tokenizer adds its own special tokens: BOS for Llama/Gemma-style tokenizers, nothing for those that add
    none (SmolLM2's `<|im_start|>` is a chat marker, not a prefix to every text). A text that already starts
    with the BOS text (a chat template that writes it) gets no second one. This is what `transformers`'
    `apply_chat_template` and lm-eval's `hf` model do.

    Example:
        >>> encode_prompts(tokenizer, ["Question: Hi\\n\\nAnswer:"])[0][:1] == [tokenizer.bos_token_id]
        True
    """
    bos = tokenizer.bos_token
    encoded: list[list[int]] = [[] for _ in texts]
    for add_special_tokens in (True, False):
        indices = [
            i for i, text in enumerate(texts) if (bool(bos) and text.startswith(bos)) != add_special_tokens
        ]
        if indices:
            options = {**_NO_SPECIAL_TOKENS, "add_special_tokens": add_special_tokens}
            for index, ids in zip(indices, tokenizer([texts[i] for i in indices], **options)["input_ids"]):
                encoded[index] = ids
    return encoded
