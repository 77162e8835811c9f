"""The one chat-template encoder: a prompt as one user turn of the model's chat template, ready for generation.

Used by the preprocessing model (`apply_chat_template`) and by the builds that tokenize prompts the way the server
will (FP8 calibration and gate). `tokenizer` is a Hugging Face tokenizer.
"""

from __future__ import annotations


def encode_user_turn(tokenizer, text: str) -> list[int] | None:
    """Token ids of `text` as one user turn followed by the assistant's generation prompt; None when the tokenizer
    has no chat template (the caller decides: refuse, or encode the text as it is)."""
    if not tokenizer.chat_template:
        return None
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True))
