"""Special tokens and the one ChatML chat template every tokenizer, trainer, exporter and server uses."""

from __future__ import annotations

import re

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]


def chat_template(label_prefix: str | None = None, unless_prefix: str | None = None, bos: bool = True) -> str:
    """ChatML, with {% generation %} around assistant turns so SFT can put the loss on them only.

    `label_prefix` is prepended to every user turn that does not start with `unless_prefix`: the
    rationale-distilled model reads `[label] question` as "answer" and `[rationale] question` as "explain"
    (Hsieh et al.'s task prefixes), so a plain user message gets the answer.
    """
    user = ""
    if label_prefix is not None:
        cond = f" and not message['content'].startswith('{unless_prefix}')" if unless_prefix else ""
        user = (f"{{% elif message['role'] == 'user'{cond} %}}"
                f"{{{{ '{label_prefix}' + message['content'] + '{IM_END}' }}}}")
    return (
        ("{{ bos_token }}" if bos else "") + "{% for message in messages %}"
        f"{{{{ '{IM_START}' + message['role'] + '\\n' }}}}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        f"{{{{ message['content'] + '{IM_END}' }}}}{{% endgeneration %}}"
        f"{user}"
        f"{{% else %}}{{{{ message['content'] + '{IM_END}' }}}}{{% endif %}}{{{{ '\\n' }}}}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{IM_START}assistant\\n' }}}}{{% endif %}}"
    )


def training_template(tokenizer, label_prefix: str | None = None, unless_prefix: str | None = None) -> str:
    """The template SFT trains with, which must mark assistant turns ({% generation %}) for the loss mask:
    the tokenizer's own when it has the marks and no prefixes are asked for; else ChatML with the marks when
    the tokenizer speaks ChatML (slmforge's models, SmolLM2, Qwen): the same turns, BOS only where the own
    template writes one, and no default system prompt; else a UserError."""
    from slmforge.errors import UserError

    own = getattr(tokenizer, "chat_template", None) or ""
    if label_prefix is None and re.search(r"\{%-?\s*generation\s*-?%\}", own):
        return own
    if IM_START in own or IM_START in tokenizer.get_vocab():
        return chat_template(label_prefix, unless_prefix, bos="bos_token" in own)
    raise UserError("sft: the base's chat template is not ChatML and does not mark assistant turns with "
                    "{% generation %}, so the loss cannot be put on the answers only; give the tokenizer a chat "
                    "template with {% generation %}...{% endgeneration %} around assistant messages")


def strip_generation_marks(template: str) -> str:
    """The template without transformers' {% generation %} markers: they only tag assistant tokens for
    training (return_assistant_tokens_mask), and the Jinja engines of llama.cpp, llama-cpp-python and
    MiniJinja-based servers do not know the tag."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and, when the vocabulary has it, <|im_end|>: a chat model's turn ends at either."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
