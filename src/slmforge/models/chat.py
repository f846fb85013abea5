"""Special tokens, the one ChatML chat template every tokenizer, trainer, exporter and server uses, and
the tokenizer_config.json that transformers 4 and 5 (and so vLLM, TGI) both load.

BOS, one convention everywhere (tests/test_chat.py and the GGUF check hold it): the chat template writes
`{{ bos_token }}` and the tokenizer's post-processor adds BOS to plain text, so a rendered chat is
tokenized WITHOUT special tokens. That is what each path does: transformers' `apply_chat_template
(tokenize=True)` (and so trl's SFT and DPO trainers, which train on exactly those ids), lm-eval's HF model
(it adds no special tokens to a text that starts with BOS), vLLM's chat endpoint (add_special_tokens is
false for chat), llama.cpp (it strips a leading BOS from the rendered template, then adds its own:
tokenizer.ggml.add_bos_token in the GGUF) and `slmforge serve` (apply_chat_template(tokenize=False), then
add_special_tokens=False). Plain text (a base model's prompt, lm-eval's choice tasks) gets BOS from the
post-processor, and pretraining documents start with BOS (packing): every model sees exactly one BOS
first, in training and at inference. The alternative, no BOS in the template, gives no BOS at all
wherever the rendered chat is tokenized without special tokens (transformers, trl, vLLM) and one in
llama.cpp: two token sequences for one conversation. Whoever renders the template to text and tokenizes
it with special tokens (`tok(text)`, add_special_tokens=True) gets two BOS: tokenize it with
add_special_tokens=False, as the model card says.
"""

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


def portable_tokenizer_config(cfg: dict, template: str | None, max_length: int | None) -> dict:
    """tokenizer_config.json as transformers 4 and 5 both read it (so older vLLM and TGI builds too).

    transformers 5 writes its extra special tokens as a list under `extra_special_tokens`, which 4.x reads
    as a dict of named tokens (`.keys()` on a list: the load fails); the list goes under
    `additional_special_tokens`, which 4.x reads as such and 5.x converts to `extra_special_tokens` on load
    (tokenization_utils_base: "Convert deprecated additional_special_tokens"). The class is
    PreTrainedTokenizerFast, which both load (5 maps it to TokenizersBackend). `template` is written
    without {% generation %} marks (MiniJinja-based servers and llama.cpp reject the tag) and also into
    the JSON, where 4.x readers and TGI look for it (chat_template.jinja beside it says the same);
    None removes it. `max_length` is the model's context (None: the key is dropped, not 1e30)."""
    out = {k: v for k, v in cfg.items() if k not in ("is_local", "local_files_only", "chat_template",
                                                       "model_max_length")}
    out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named tokens: the same in 4.x and 5.x
        out["extra_special_tokens"] = extra
    elif extra:
        have = [str(t) for t in out.get("additional_special_tokens") or []]
        out["additional_special_tokens"] = have + [str(t) for t in extra if str(t) not in have]
    if template:
        out["chat_template"] = strip_generation_marks(template)
    if max_length is not None:
        out["model_max_length"] = int(max_length)
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and, when the vocabulary has it, <|im_end|>: a chat model's turn ends at either."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
