"""Byte-level BPE (HF tokenizers): train, load, and the bytes each token stands for."""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import UserError, first_line
from .schema import repair_text

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Every byte is in the initial alphabet, so any UTF-8 text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((repair_text(t) for t in texts), trainer)  # the tokenizer takes UTF-8 only
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(json_text: str, where: str = "the tokenizer") -> Tokenizer:
    """A tokenizer from its JSON; a damaged one is a UserError naming `where` it came from."""
    try:
        tok = Tokenizer.from_str(json_text)
    except Exception as e:  # tokenizers raises a bare Exception for text it cannot parse
        raise UserError(f"{where} is damaged (not a tokenizer JSON): {first_line(e)}")
    # "<|endoftext|>" written in a text is text, not a document boundary: encode it as such
    # (the flag is not part of the JSON, so it is set on every load)
    tok.encode_special_tokens = True
    return tok


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each id decodes to (special tokens count 0): the denominator of bits per byte."""
    return [len(b) for b in token_bytes(tok)]


def split_chunks(text: str, size: int) -> Iterator[str]:
    """Cut text into pieces of about `size` characters at places where byte-level BPE's
    pre-tokenizer would cut anyway (a lone newline between two non-space characters), so
    encoding the pieces gives exactly the tokens of encoding the whole text."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        while end < n and not (
            end >= 2 and text[end - 1] == "\n" and not text[end - 2].isspace() and not text[end].isspace()
        ):
            end += 1
        yield text[start:end]
        start = end


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's): printable bytes stand for themselves, the other bytes
    take the code points from 256 up, in byte order. Maps each character back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The exact bytes each id stands for (b"" for special tokens), for streaming decode."""
    char_to_byte = _byte_level_chars()
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        out.append(b"" if s is None or s in specials else bytes(char_to_byte[c] for c in s))
    return out
