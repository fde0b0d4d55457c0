"""Corpora to token files, and batches from token files.

A data dir comes in one of two layouts; meta.json (written last, so a data dir without it is
incomplete and never used) says which:

- single (`minideep tokenize FILE`): tokenizer.json, train.bin, val.bin (raw uint16/uint32 tokens,
  memory-mapped, never loaded whole). Validation = the last val_fraction of the text.
- shards (many documents: text files, JSONL, parquet, a Hugging Face dataset): tokenizer.json,
  val_000000.bin, then train_000000.bin, train_000001.bin, ... of shard_tokens tokens each (the
  last one shorter). Every document is preceded by <|endoftext|>; the files are read in a seeded
  random order and the first documents (all of a corpus up to 100M tokens) written in one, so
  validation, the first val_tokens tokens of the stream, is a random sample of whole documents
  (about 10% by default: plan_split).

Training reads epochs of shuffled windows over every train shard (each token at most once an
epoch; the sampler state is a torch.Generator's and a place in the epoch), or, with
`data.order: sequential`, the shards in order as one stream (state: shard, offset, epoch).

The modules, in the order data flows through them:

  sources.py  files, folders (every text file, by content), JSONL, parquet, a dataset -> documents
  encode.py   text -> token arrays, in worker processes for many documents
  prepare.py  one text -> the single layout; the dtype and output-folder check both layouts share
  shards.py   many documents -> the sharded layout: the split plan, resumable shard writing
  loader.py   a data dir -> TokenData, and the samplers that read training batches from it
  corpus.py   `minideep tokenize`'s engine: which of the two layouts a corpus gets

The names below are the ones the rest of minideep uses, so it imports them from here.
"""

from .corpus import tokenize_corpus
from .loader import ShardReader, ShuffledWindows, TokenData, get_batch, make_sampler, open_or_none
from .prepare import bundled_data_dir, split_text, tokenize_text
from .shards import plan_split, tokenize_source
from .sources import FileScan, Source, bundled_corpus, find_files, read_text_file, scan_paths

__all__ = ["FileScan", "ShardReader", "ShuffledWindows", "Source", "TokenData", "bundled_corpus", "bundled_data_dir",
           "find_files", "scan_paths", "get_batch", "make_sampler", "open_or_none", "plan_split", "read_text_file",
           "split_text", "tokenize_corpus", "tokenize_source", "tokenize_text"]
