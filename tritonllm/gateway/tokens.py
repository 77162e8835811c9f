"""The served model's tokenizer in the gateway: chat turns rendered with its chat template, and token counts.

Chat requests reach Triton as text already rendered with the template (`apply_chat_template` off), so system
prompts and multi-turn histories work; the preprocessing model encodes that text with the tokenizer's special
tokens, which for a single user turn gives exactly the ids its own `apply_chat_template` would. `usage` counts the
prompt as the preprocessing model encodes it, and the answer by encoding its text (equal to the tokens generated
whenever the model's output is the tokenizer's own encoding of that text, as it is for trained models).
"""

from __future__ import annotations

from pathlib import Path

from tritonllm.gateway.openai_api import APIError, GenerationRequest


class PromptTokens:
    def __init__(self, tokenizer_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    def prompt_text(self, request: GenerationRequest) -> str:
        if request.kind == "completion":
            return request.prompt
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; send the prompt to /v1/completions instead",
                           param="messages", code="no_chat_template")
        return self.tokenizer.apply_chat_template([{"role": role, "content": text} for role, text in
                                                   request.messages], add_generation_prompt=True, tokenize=False)

    # Counted by the `tokenizers` backend itself: the same ids as the transformers call without its per-call
    # bookkeeping.
    def count_prompt(self, text: str) -> int:
        return len(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids)

    def count_completion(self, text: str) -> int:
        return len(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids) if text else 0


def repository_tokenizer_dir(repository: Path) -> Path:
    """The tokenizer folder a rendered repository's preprocessing model reads (the gateway's must be the same)."""
    from tritonllm.builders.model_config import PREPROCESSING, TOKENIZER_FOLDER, VERSION

    folder = Path(repository) / PREPROCESSING / VERSION / TOKENIZER_FOLDER
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} holds no tokenizer.json: is {repository} a repository rendered by "
                                "`tritonllm build`?")
    return folder


def repository_served_name(repository: Path) -> str | None:
    """The name a rendered repository serves its model under (its preprocessing model's parameter); None for a
    repository rendered before builds recorded it. ValueError when an edit made that config unreadable."""
    from tritonllm.builders.lint import CONFIG_FILE, format_findings, parse_config_text
    from tritonllm.builders.model_config import PREPROCESSING
    from tritonllm.contract import SERVED_NAME_PARAMETER, read_parameters

    file = Path(repository) / PREPROCESSING / CONFIG_FILE
    config, findings = parse_config_text(file.read_text(), str(file))
    if config is None:
        raise ValueError(format_findings(findings))
    return read_parameters(config).get(SERVED_NAME_PARAMETER) or None
