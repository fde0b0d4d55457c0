from conftest import HOSTILE

from minideep_cli.data import TokenData, split_text, tokenize_text
from minideep_cli.tokenizer import EOT, split_chunks, token_byte_lengths, token_bytes, train_tokenizer


def test_round_trip_hostile_text(corpus_text):
    tok = train_tokenizer([corpus_text[:20000]], vocab_size=400)
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(EOT) is not None
    # text the tokenizer never saw, including bytes absent from its training data
    for s in [HOSTILE, HOSTILE * 3, "\r\n\r\n", "x", "\t", "🎉", "\x00nul"]:
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s
        # every token maps to exact bytes: concatenated they are the UTF-8 text
        pieces = token_bytes(tok)
        assert b"".join(pieces[i] for i in ids) == s.encode("utf-8")


def test_byte_lengths_count_utf8_bytes(corpus_text):
    tok = train_tokenizer([corpus_text[:20000]], vocab_size=300)
    lengths = token_byte_lengths(tok)
    ids = tok.encode(HOSTILE).ids
    assert sum(lengths[i] for i in ids) == len(HOSTILE.encode("utf-8"))
    assert lengths[tok.token_to_id(EOT)] == 0


def test_chunked_encoding_equals_whole(corpus_text):
    tok = train_tokenizer([corpus_text[:30000]], vocab_size=500)
    text = corpus_text[:30000] + HOSTILE + "a  \nb\n\nc \n d\nend"
    chunks = list(split_chunks(text, 97))
    assert "".join(chunks) == text and len(chunks) > 50
    whole = tok.encode(text).ids
    pieces = [i for c in chunks for i in tok.encode(c).ids]
    assert pieces == whole


def test_tokenize_writes_split_and_meta(tmp_path, corpus_text):
    text = corpus_text[:50000] + HOSTILE
    meta = tokenize_text(text, tmp_path / "d", vocab_size=300)
    d = TokenData.open(tmp_path / "d")
    train_text, val_text = split_text(text, 0.1)
    assert len(val_text) == len(text) - int(len(text) * 0.9)  # last 10% of the characters
    tok = d.tokenizer()
    assert tok.decode(list(map(int, d.train))) == train_text
    assert tok.decode(list(map(int, d.val))) == val_text
    assert meta["val_bytes"] == len(val_text.encode()) and meta["train_tokens"] == len(d.train)
    assert d.train.dtype.name == "uint16" and meta["dtype"] == "uint16"
