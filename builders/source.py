"""The model source of a build: a plain Hugging Face folder, converted once from a GGUF file when needed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from .architecture import SUPPORTED_MODEL_TYPES
from .errors import BuildError
from .files import atomic_dir

SPECIAL_TOKEN_ROLES = ("bos", "eos", "pad")
CONVERSION_VERSION = 3  # bump when the conversion writes different files (new hf-* cache folder)
# GGUF token types (llama.cpp's llama_token_type) of SentencePiece vocabularies.
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN = 1, 3, 4

ProgressNote = Callable[[str], None]


def content_key(path: Path) -> str:
    """sha256 (hex) of a file's bytes, or of a folder's relative file names and contents (sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(digest, file)
    else:
        raise BuildError(f"cannot hash {path}: it does not exist")
    return digest.hexdigest()


def _hash_file(digest: "hashlib._Hash", file: Path) -> None:
    with file.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)


def resolve_source(model: str | Path | None) -> Path:
    """The file or folder `model` names: None is the bundled SmolLM2 GGUF, a bundled model's name
    (`tritonllm.paths.BUNDLED_MODELS`) its file, anything else a path that must exist."""
    from tritonllm.paths import BUNDLED_MODELS, bundled_name

    name = bundled_name(model)
    if name is not None:
        try:
            return BUNDLED_MODELS[name]()
        except FileNotFoundError as error:
            raise BuildError(f"model {name!r}: {error}") from error
    path = Path(model).expanduser()
    if not path.exists():
        raise BuildError(f"model {str(model)!r} does not exist; give a Hugging Face model folder, a .gguf file or "
                         f"a bundled model: {', '.join(BUNDLED_MODELS)}")
    return path


def prepare_hf_model(model: str | Path | None, cache_root: Path, progress: ProgressNote | None = None) -> Path:
    """A validated HF folder for `model` (see `resolve_source`): a .gguf file, or an HF folder.

    A GGUF file is converted once into `cache_root/hf-<content hash>/` (float32 weights, tokenizer with its special
    tokens checked against the generation config); later calls return that folder. An HF folder is used in place.
    """
    path = resolve_source(model)
    if path.is_dir():
        validate_hf_folder(path)
        return path
    if path.suffix.lower() == ".gguf":
        return _convert_gguf(path, Path(cache_root), progress or (lambda message: None))
    raise BuildError(f"model {str(model)!r} is not supported: give a Hugging Face model folder "
                     f"(config.json + tokenizer.json) or a .gguf file")


def validate_hf_folder(folder: Path) -> None:
    """Raise BuildError unless `folder` holds a decoder-only model of a supported family with a fast tokenizer."""
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise BuildError(f"model folder {folder} has no {name}; a Hugging Face model folder with config.json and "
                             f"tokenizer.json is needed")
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(f"model folder {folder}: model_type {model_type!r} is not supported; allowed: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only)")
    if config.get("use_cache") is False:
        raise BuildError(f"model folder {folder}: config.json sets use_cache = false; the export needs a KV cache")
    check_special_tokens(folder)


def check_special_tokens(folder: Path) -> None:
    """The tokenizer's bos/eos/pad ids must be the generation config's (an engine stops on one, a client on the
    other); raise BuildError naming each mismatch."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = _generation_config(folder, GenerationConfig)
    mismatches = []
    for role in SPECIAL_TOKEN_ROLES:
        wanted = _ids(getattr(generation, f"{role}_token_id"))
        actual = getattr(tokenizer, f"{role}_token_id")
        if wanted and actual not in wanted:
            mismatches.append(f"{role}: tokenizer has {getattr(tokenizer, f'{role}_token')!r} (id {actual}), "
                              f"generation config says id {' or '.join(map(str, wanted))}")
    if mismatches:
        raise BuildError(f"model folder {folder}: special tokens disagree: " + "; ".join(mismatches))


def _generation_config(folder: Path, generation_config_class):
    if (folder / "generation_config.json").is_file():
        return generation_config_class.from_pretrained(folder)
    from transformers import AutoConfig

    return generation_config_class.from_model_config(AutoConfig.from_pretrained(folder))


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _convert_gguf(gguf: Path, cache_root: Path, progress: ProgressNote) -> Path:
    target = cache_root / f"hf-{content_key(gguf)[:16]}-v{CONVERSION_VERSION}"
    if target.is_dir():  # written under a temporary name and renamed: present means complete
        return target
    progress(f"converting {gguf.name} to a Hugging Face folder")
    with atomic_dir(target, replace=False) as work:  # another build that converted the same file first wins
        _gguf_to_hf(gguf, work)
        try:
            check_special_tokens(work)
        except BuildError as error:
            raise BuildError(f"converting {gguf}: {error}") from error
    return target


def _gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises assorted types for unreadable or unsupported GGUF files
        raise BuildError(f"cannot load {gguf} with transformers: {type(error).__name__}: {error}") from error
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(f"{gguf}: model_type {model_type!r} is not supported; allowed: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields  # parsing takes seconds (every tensor's header): once
    if _gguf_string(fields, "tokenizer.ggml.model") == "llama" and \
            json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        tokenizer._tokenizer = _sentencepiece_bpe(fields, tokenizer.backend_tokenizer)
    _align_special_tokens(tokenizer, model.generation_config)
    # transformers ignores the GGUF's add_bos_token (SmolLM2: false) and would prefix every raw prompt with
    # <|im_start|>; and its default clean-up rewrites " ." to "." on decode, which the byte-exact detokenizer never
    # does. Keep what the GGUF says, and decode text as the tokenizer's bytes say.
    tokenizer.add_bos_token = _gguf_flag(fields, "tokenizer.ggml.add_bos_token", default=tokenizer.add_bos_token)
    tokenizer.clean_up_tokenization_spaces = False
    model.config.architectures = [type(model).__name__]  # a config built from GGUF metadata has none
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_flag(fields: dict, key: str, default: bool) -> bool:
    field = fields.get(key)
    return bool(field.parts[-1][0]) if field is not None else default


def _gguf_string(fields: dict, key: str) -> str | None:
    field = fields.get(key)
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None


def _sentencepiece_bpe(fields: dict, converted):
    """A GGUF's SentencePiece vocabulary (`tokenizer.ggml.model` = llama: pieces and scores, no merges) as a BPE
    tokenizer that segments like SentencePiece BPE and llama.cpp: from characters (bytes where a character is not a
    piece), repeatedly join the adjacent pair whose joined piece scores highest.

    transformers 4.57 turns Gemma's GGUF vocabulary into a Unigram model instead, which splits common words into
    fragments ("The capital of France is": 10 pieces against llama.cpp's 5). Normalizer, decoder and
    post-processor stay those of `converted` (transformers' conversion); control tokens become special tokens and
    user-defined ones (runs of spaces, tabs, newlines) added tokens, matched before the model as llama.cpp does.
    """
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    def values(key: str) -> list:
        field = fields[key]
        return [field.parts[index] for index in field.data]

    tokens = [bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")]
    scores = [float(part[0]) for part in values("tokenizer.ggml.scores")]
    types = [int(part[0]) for part in values("tokenizer.ggml.token_type")]
    vocab = {token: index for index, token in enumerate(tokens)}
    normal = {token for token, kind in zip(tokens, types) if kind == NORMAL_TOKEN}
    ranked = []  # (score of the joined piece, its id, cut): higher scores merge first, ties in vocabulary order
    for index, token in enumerate(tokens):
        if types[index] == NORMAL_TOKEN:
            ranked += [(-scores[index], index, cut) for cut in range(1, len(token))
                       if token[:cut] in normal and token[cut:] in normal]
    ranked.sort()
    merges = [(tokens[index][:cut], tokens[index][cut:]) for _, index, cut in ranked]
    unknown = fields.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(BPE(vocab, merges, unk_token=tokens[int(unknown.parts[-1][0])] if unknown else None,
                            fuse_unk=True, byte_fallback=True))
    backend.normalizer, backend.pre_tokenizer = converted.normalizer, converted.pre_tokenizer
    backend.decoder, backend.post_processor = converted.decoder, converted.post_processor
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types) if kind == USER_DEFINED_TOKEN])
    return backend


def _align_special_tokens(tokenizer, generation_config) -> None:
    # transformers 4.57 reads SmolLM2's GGUF tokenizer with bos = eos = <|im_start|> and no pad, while the GGUF
    # metadata (and so the generation config) says eos = pad = id 2 (<|im_end|>): take the ids from the generation
    # config, which comes from the GGUF's own token ids.
    for role in SPECIAL_TOKEN_ROLES:
        wanted = _ids(getattr(generation_config, f"{role}_token_id"))
        if wanted and getattr(tokenizer, f"{role}_token_id") not in wanted:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(wanted[0]))
