"""The `minideep` command: parse, resolve the config, call one engine function, render.

Torch and the engine modules are imported inside the commands, so `minideep --help` is instant.
A UserError becomes one line on stderr and exit code 1 (a traceback only with --debug).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import __version__
from .errors import UserError
from .files import writable, write_file

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Train small language models, dense or Mixture-of-Experts, from raw text to samples.\n\n"
    "Quick start: [bold]minideep train[/bold] (bundled tiny Shakespeare, preset picked for this machine).",
)


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def guarded(fn):
    """Turn user mistakes (and failures of files and devices) into one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(ctx: typer.Context, *args, **kwargs):
        debug = bool(ctx.obj and ctx.obj.get("debug"))
        try:
            return fn(ctx, *args, **kwargs)
        except UserError as e:
            if debug:
                raise
            _err(str(e))
            raise typer.Exit(1)
        except typer.Exit:  # a deliberate exit code (click's Exit is a RuntimeError)
            raise
        except (OSError, RuntimeError, ValueError) as e:
            if debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            _err(f"{type(e).__name__}: {first} (rerun with --debug for the traceback)")
            raise typer.Exit(1)

    return wrapper


def _version(value: bool):
    if value:
        print(f"minideep {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    ctx.obj = {"debug": debug}


Overrides = Annotated[
    Optional[List[str]],
    typer.Option("-o", "--override", help="section.key=value, repeatable; e.g. -o train.lr=3e-4"),
]


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


# ---------------------------------------------------------------- tokenize


@app.command()
@guarded
def tokenize(
    ctx: typer.Context,
    files: Annotated[Optional[List[Path]], typer.Argument(
        help="Text, JSONL or parquet files, or folders of them; default: the bundled tiny Shakespeare.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="A Hugging Face dataset (streamed; needs the `hf` extra) or a local dataset folder.")] = None,
    name: Annotated[Optional[str], typer.Option(help="The dataset's configuration, e.g. sample-10BT.")] = None,
    split: Annotated[str, typer.Option(help="The dataset split to read.")] = "train",
    text_column: Annotated[str, typer.Option(help="The text field of JSONL, parquet and dataset rows.")] = "text",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (256 bytes + merges + <|endoftext|>).")] = 2048,
    out: Annotated[Path, typer.Option(help="Output data dir.")] = Path("data/tokens"),
    val_fraction: Annotated[float, typer.Option(help="One text file: the last fraction kept for validation.")] = 0.1,
    shard_tokens: Annotated[Optional[int], typer.Option(
        help="Sharded: tokens per train shard; default: a quarter of the training split, at most 100M.")] = None,
    val_tokens: Annotated[Optional[int], typer.Option(
        help="Sharded: tokens of the validation shard; default: the first whole documents, about 10%, at most 10M.")] = None,
    tokenizer_sample_bytes: Annotated[Optional[int], typer.Option(
        help="Sharded: train the tokenizer on the first this many bytes of text; default: 100M.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Sharded: stop after this many tokens in all.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Encoding processes; default: CPU cores - 1.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a data dir made from other text or settings, "
                                        "or write into a folder holding other files.")] = False,
):
    """Train a byte-level BPE and encode a corpus into train/val token files.

    One text file gives train.bin/val.bin (validation = the last 10%). Many documents (several
    files, folders, JSONL, parquet, --dataset) give token shards, validation first (by default
    the first whole documents, about 10% of the tokens), each document after an
    <|endoftext|>; rerunning an interrupted command resumes at the last complete shard. An --out holding other data (which runs may have trained on) is refused
    without --force.

    Example: [bold]minideep tokenize input.txt --vocab-size 4096 --out data/mytext[/bold]
    then [bold]minideep train --data data/mytext[/bold] ·
    [bold]minideep tokenize --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --vocab-size 32768 --out data/fineweb[/bold]
    """
    import os

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from .data import (Source, bundled_corpus, find_files, read_text_file, tokenize_source, tokenize_text)

    if vocab_size < 257:
        raise UserError("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    if not 0 < val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    if dataset and files:
        raise UserError("give input files or --dataset, not both")
    sharding = (shard_tokens, val_tokens, tokenizer_sample_bytes, max_tokens)
    paths = find_files(files) if files else []
    single = not dataset and len(paths) <= 1 and all(v is None for v in sharding) and not (
        paths and (files[0].is_dir() or paths[0].name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet"))))
    if single:
        src = paths[0] if paths else bundled_corpus()
        text = read_text_file(src)
        with Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("encoding", total=len(text))
            meta = tokenize_text(text, out, vocab_size, val_fraction, str(src),
                                 progress=lambda done, total: bar.update(task, completed=done), force=force)
        print(f"wrote {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
              f"({meta['train_bytes']:,} bytes), val {meta['val_tokens']:,} tokens ({meta['val_bytes']:,} bytes)")
        return

    source = Source(files=paths, dataset=dataset or "", name=name, split=split, text_column=text_column)
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    for opt, v in (("--shard-tokens", shard_tokens), ("--val-tokens", val_tokens),
                   ("--tokenizer-sample-bytes", tokenizer_sample_bytes), ("--max-tokens", max_tokens)):
        if v is not None and v <= 0:
            raise UserError(f"{opt} must be positive")
    first: dict = {}

    def show(info: dict) -> None:
        if info["phase"] == "tokenizer":
            bar.update(task, info=f"training the tokenizer on up to {info['bytes'] / 1e6:,.0f} MB of text")
        elif info["phase"] == "encode":
            el, f = info["elapsed"], info["fraction"]
            text = (f"{info['documents']:,} docs  {info['tokens']:,} tokens  "
                    f"{info['bytes'] / 1e6 / max(el, 1e-9):,.1f} MB/s")
            first.setdefault("f", f or 0.0)
            first.setdefault("t", el)
            if f and f > first["f"] and el > first["t"]:
                eta = (1 - f) * (el - first["t"]) / (f - first["f"])
                text += f"  ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 else f'{eta / 86400:.1f} days'}"
            bar.update(task, completed=1000 * f if f else 0, info=text)

    with Progress(TextColumn("[bold]tokenize"), BarColumn(), TextColumn("{task.fields[info]}"), transient=True) as bar:
        task = bar.add_task("tokenize", total=1000, info="reading")
        meta = tokenize_source(
            source, out, vocab_size,
            shard_tokens=shard_tokens, val_tokens=val_tokens,
            tokenizer_sample_bytes=tokenizer_sample_bytes or 100_000_000, max_tokens=max_tokens or 0,
            workers=workers or max(1, (os.cpu_count() or 2) - 1), progress=show, force=force)
    print(split_summary(out, meta))


def split_summary(out: Path, meta: dict) -> str:
    """What a sharded tokenize wrote, and how its split and shard size were chosen."""
    settings, total = meta["settings"], meta["train_tokens"] + meta["val_tokens"]
    n_train = sum(1 for s in meta["shards"] if s["split"] == "train")
    val_docs = meta.get("val_documents", 0)
    how = ("--val-tokens" if settings["val_tokens"] else
           "the default: the first whole documents, about 10% of the tokens, at most 10,000,000")
    if meta.get("val_cut"):
        how += "; its last document is cut and goes on in train"
    shard_how = "--shard-tokens" if settings["shard_tokens"] else "the default: a quarter of train, at most 100,000,000"
    return (f"wrote {out}: vocab {meta['vocab_size']}, {meta['documents']:,} documents, {total:,} tokens\n"
            f"  validation: {val_docs:,} documents, {meta['val_tokens']:,} tokens ({meta['val_bytes']:,} bytes), "
            f"{meta['val_tokens'] / total:.1%} ({how})\n"
            f"  train: {meta['documents'] - val_docs:,} documents, {meta['train_tokens']:,} tokens "
            f"({meta['train_bytes']:,} bytes) in {n_train} shards of up to "
            f"{meta.get('shard_tokens', settings['shard_tokens']):,} ({shard_how})")


# ---------------------------------------------------------------- train


def auto_preset() -> str:
    import torch

    if torch.cuda.is_available():
        return "a100" if torch.cuda.get_device_properties(0).total_memory >= 30e9 else "rtx3060"
    return "cpu"


class TrainView:
    """Renders training events: a rich progress bar with loss and ETA, and one line per eval."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = None
        self.tok_task = None

    def __call__(self, kind: str, info: dict):
        c = self.console
        if kind == "tokenize":
            if self.tok_task is None:
                self.bar.start()
                self.tok_task = self.bar.add_task("tokenize", total=info["total"], info="tokenizing the bundled corpus")
            self.bar.update(self.tok_task, completed=info["done"])
        elif kind == "start":
            if self.tok_task is not None:
                self.bar.remove_task(self.tok_task)
            budget = []
            if info["max_steps"]:
                budget.append(f"{info['max_steps']} steps")
            if info["max_minutes"]:
                budget.append(f"{info['max_minutes']:g} min")
            c.print(f"run dir {info['run_dir']}  device {info['device']} ({info['dtype']})  "
                    f"params {info['params'] / 1e6:.2f}M (active {info['active_params'] / 1e6:.2f}M)  "
                    f"{info['tokens_per_step']:,} tokens/step  budget {' or '.join(budget)}"
                    + (f"  {info['world']} ranks ({info['distributed']})" if info.get("world", 1) > 1 else ""))
            self.bar.start()
            self.task = self.bar.add_task("train", total=1000, info="")
        elif kind == "step":
            text = f"step {info['step']}  loss {info['loss']:.3f}  lr {info['lr']:.1e}  {info['tokens_per_sec']:,.0f} tok/s"
            if "imbalance" in info:
                text += f"  imb {info['imbalance']:.2f}"
            self.bar.update(self.task, completed=min(1000, 1000 * info["progress"]), info=text)
        elif kind == "eval":
            mark = " *" if info["best"] else ""
            c.print(f"step {info['step']:>6}  val loss {info['loss']:.4f}  val bpb {info['bpb']:.4f}{mark}")
        elif kind == "diverged":
            kept = "The last good checkpoint is intact" if info["saved"] else "No checkpoint had been saved yet"
            c.print(f"[red]loss became {info['loss']} at step {info['step']}; stopped. {kept}; try a lower train.lr "
                    "or train.muon_lr.[/red]", soft_wrap=True)  # one line, whatever the terminal's width
        elif kind == "final_eval":
            self.bar.stop()
            c.print("evaluating on the full validation split ...")
        elif kind == "note":
            c.print(f"note: {info['text']}")

    def close(self):
        self.bar.stop()


@app.command()
@guarded
def train(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option(help="cpu | rtx3060 | a100 | seed; default: picked for this machine.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with model/data/train/sample sections.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="moe (default) or gpt2.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Data dir from `minideep tokenize`; default: bundled corpus.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run dir; default: runs/<time>-<arch>.")] = None,
    override: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out (default: the newest run) exactly.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start a new run in a non-empty --out (its files may be "
                                        "replaced).")] = False,
):
    """Train a model; prints validation bits per byte and a sample at the end.

    Examples: [bold]minideep train[/bold] ·
    [bold]minideep train --arch gpt2 -o train.max_minutes=5[/bold] ·
    [bold]minideep train --preset rtx3060 --data data/mytext --out runs/big[/bold] ·
    [bold]minideep train --resume --out runs/big -o train.max_steps=20000[/bold] ·
    [bold]torchrun --nproc_per_node=4 -m minideep_cli train --data data/fineweb -o train.distributed=fsdp[/bold]
    """
    from .checkpoint import load_checkpoint, newest_run
    from .config import Config, moe_only_keys, parse_override, resolve_config, set_value, validate
    from .train import train as run_train

    overrides = list(override or [])
    if resume:
        given = [flag for flag, v in (("--preset", preset), ("--config", config), ("--arch", arch)) if v is not None]
        if given:
            raise UserError(f"--resume continues the run's saved config: {', '.join(given)} cannot change it "
                            "(-o train.KEY=VALUE can, e.g. -o train.max_steps=20000)")
        run_dir = out or newest_run()
        if run_dir is None:
            raise UserError("--resume: no run to resume under ./runs; give --out RUN_DIR")
        cfg = Config.from_dict(load_checkpoint(Path(run_dir) / "last.pt")["config"]) if (Path(run_dir) / "last.pt").is_file() \
            else None
        if cfg is None:
            raise UserError(f"--resume: no last.pt in {run_dir}")
        for o in overrides:
            k, v = parse_override(o)
            if cfg.model.arch == "gpt2" and k in [f"model.{m}" for m in moe_only_keys()]:
                raise UserError(f"{k} is a moe-arch setting (gpt2 does not use it); this run is gpt2")
            set_value(cfg, k, v, "overrides")
        if data:
            cfg.data.dir = str(data)
        validate(cfg)
    else:
        cfg = resolve_config(preset if preset is not None else (None if config else auto_preset()),
                             str(config) if config else None,
                             overrides, arch)
        if data:
            cfg.data.dir = str(data)
        run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.arch}"

    console = _console()
    view = TrainView(console)
    try:
        result = run_train(cfg, run_dir, resume=resume, on_event=view, force=force)
    finally:
        view.close()
    interrupted = 128 + (result.signal or 2)  # as a shell reports a process a signal ended: 130 SIGINT, 143 SIGTERM
    if not result.main:  # torchrun: rank 0 reports for every rank
        if result.stopped != "done":
            raise typer.Exit(1 if result.stopped == "diverged" else interrupted)
        return
    if result.stopped == "interrupted":
        console.print(f"stopped at step {result.step}; saved {result.run_dir / 'last.pt'} "
                      f"(continue with: minideep train --resume --out {result.run_dir})")
        raise typer.Exit(interrupted)
    if result.stopped == "diverged":
        raise typer.Exit(1)
    v = result.val
    console.print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed / 60:.1f} min")
    which = f"best checkpoint, step {result.val_step}" if result.val_step != result.step else f"step {result.step}"
    console.print(f"[bold]val bits per byte {v['bpb']:.4f}[/bold]  ({which}; loss {v['loss']:.4f} nats/token, "
                  f"perplexity {v['perplexity']:.2f}, {v['tokens']:,} tokens)")
    console.print(f"checkpoints: {result.run_dir / 'best.pt'}, {result.run_dir / 'last.pt'}")
    if result.sample:
        console.print("[bold]sample:[/bold]")
        console.print(result.sample, markup=False)


# ---------------------------------------------------------------- eval


@app.command("eval")
@guarded
def eval_cmd(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or run dir (its best.pt).")],
    text: Annotated[Optional[Path], typer.Option(help="Evaluate on this UTF-8 text file.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Evaluate on this data dir's validation split.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
):
    """Loss, perplexity and bits per byte of a checkpoint.

    Example: [bold]minideep eval runs/20260101-120000-moe --text holdout.txt[/bold]
    (without --text/--data: the validation split the model was trained with).
    """
    import json

    import numpy as np

    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
    from .data import TokenData, open_or_none, read_text_file
    from .evaluate import evaluate_tokens
    from .tokenizer import load_tokenizer, split_chunks, token_byte_lengths
    from .train import pick_device, pick_dtype

    if text and data:
        raise UserError("give --text or --data, not both")
    path = resolve_checkpoint(str(ckpt))
    state = load_checkpoint(path)
    dev = pick_device(device, "--device")
    model, cfg = model_from_checkpoint(state, dev, path)
    tok = load_tokenizer(state["tokenizer"])
    if text:
        body = read_text_file(text)
        tokens = np.asarray([i for c in split_chunks(body, 1 << 20) for i in tok.encode(c).ids], dtype=np.int64)
        source = str(text)
    else:
        dd = TokenData.open(data) if data else open_or_none(cfg)
        if dd is None:
            raise UserError("the checkpoint's training data is not on this machine; give --text or --data")
        if dd.tokenizer_json != state["tokenizer"]:
            raise UserError(f"{dd.dir} was tokenized with another tokenizer than this checkpoint's")
        tokens, source = dd.val, f"{dd.dir} (val)"
    if len(tokens) < 2:
        raise UserError("the text is too short to evaluate (fewer than 2 tokens)")
    res = evaluate_tokens(model, tokens, token_byte_lengths(tok), cfg.model.block_size,
                          batch_size=8, device=dev, dtype=pick_dtype(cfg.train.dtype, dev))
    res.update({"checkpoint": str(path), "source": source, "step": state["loop"]["step"]})
    if json_out:
        print(json.dumps(res, indent=2))
    else:
        print(f"{path} on {source}: loss {res['loss']:.4f} nats/token  perplexity {res['perplexity']:.2f}  "
              f"bits per byte {res['bpb']:.4f}  ({res['tokens']:,} tokens, {res['bytes']:,} bytes)")


# ---------------------------------------------------------------- sample


@app.command()
@guarded
def sample(
    ctx: typer.Context,
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint file or run dir; default: newest run in runs/.")] = None,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling; 1.0 = off.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1337,
    num_samples: Annotated[int, typer.Option(help="How many samples.")] = 1,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole context each token (for checking).")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    show_routing: Annotated[bool, typer.Option("--show-routing", help="Live view: each token's expert path, "
                                               "router probabilities, running load, entropy, top predictions.")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="With --show-routing: one tab-separated line per token "
                                        "instead of the live panel (for pipes); implies --show-routing.")] = False,
):
    """Generate text from a checkpoint, streaming tokens as they come (with a KV cache).

    Example: [bold]minideep sample runs/20260101-120000-moe --prompt "ROMEO:" --temperature 0.7 --top-k 50[/bold] ·
    live routing: [bold]minideep sample runs/mine --prompt "ROMEO:" --show-routing[/bold] ·
    one line per token: [bold]minideep sample runs/mine --max-new-tokens 20 --plain | cut -f3,6-[/bold]
    """
    import codecs

    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
    from .config import SampleConfig, validate_sample
    from .generate import generate
    from .tokenizer import load_tokenizer, token_bytes
    from .train import pick_device

    validate_sample(SampleConfig(prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples),
                    lambda name: "--" + name.replace("_", "-"))
    path = resolve_checkpoint(str(ckpt) if ckpt else None)
    state = load_checkpoint(path)
    dev = pick_device(device, "--device")
    model, cfg = model_from_checkpoint(state, dev, path)
    tok = load_tokenizer(state["tokenizer"])
    pieces = token_bytes(tok)
    prompt_ids = tok.encode(prompt).ids
    g = torch.Generator(device=dev).manual_seed(seed)
    if show_routing or plain:
        return _sample_routing(model, cfg, pieces, prompt, prompt_ids, max_new_tokens, num_samples, plain,
                               dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                                    use_cache=not no_cache, device=dev))
    for n in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {n + 1}")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(prompt)
        for i in generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, g, not no_cache, dev):
            sys.stdout.write(decoder.decode(pieces[i]))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")


def _sample_routing(model, cfg, pieces, prompt, prompt_ids, max_new_tokens, num_samples, plain, sampling):
    """sample --show-routing: a live panel (or --plain lines) fed by generate_steps."""
    import codecs

    from .generate import generate_steps
    from .models.transformer import is_moe_layer
    from .routing import summarize_step, vocab_texts
    from .views.live import LivePanel, plain_line

    vocab_text = vocab_texts(pieces)
    moe = cfg.model.arch == "moe"
    n_experts = cfg.model.n_experts if moe else 0
    moe_layers = [i for i in range(cfg.model.n_layer) if moe and is_moe_layer(cfg.model, i)]
    note = None if moe else (
        f"{cfg.model.arch} is a dense model: it has no experts to route to, so only the text and the "
        "predictions are shown")
    console = _console()
    if note and plain:
        print(f"note: {note}", file=sys.stderr)
    for n in range(num_samples):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        views = (summarize_step(i + 1, s.token, s.logits, s.routing(), s.moe_layers, decoder.decode(pieces[s.token]),
                                n_experts)
                 for i, s in enumerate(generate_steps(model, prompt_ids, max_new_tokens, **sampling)))
        if plain:
            if num_samples > 1:
                print(f"--- sample {n + 1}")
            for sv in views:
                print(plain_line(sv, vocab_text), flush=True)
            continue
        from rich.live import Live

        panel = LivePanel(prompt, vocab_text, moe_layers, n_experts, max_new_tokens, note)
        if num_samples > 1:
            console.print(f"--- sample {n + 1}")
        with Live(panel, console=console, refresh_per_second=4, transient=False):
            for sv in views:
                panel.add(sv)


@app.command("inspect-routing")
@guarded
def inspect_routing(
    ctx: typer.Context,
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint file or run dir (its best.pt); with --history a "
                                                   "run dir. Default: the newest run in runs/.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Route this UTF-8 text file.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Route this text.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Block index of the MoE layer that colours the text and whose "
                                                 "experts are detailed; default: the last MoE layer.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every number to this JSON file "
                                                     "(stable keys, schema minideep.routing/1).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write one self-contained HTML report (no network).")] = None,
    history: Annotated[bool, typer.Option("--history", help="How balance evolved over the run's training, from "
                                          "its TensorBoard logs.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Route at most this many tokens of the text.")] = 20000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
):
    """See which experts each token uses: loads, balance, entropy, drops, specialisation, paths.

    Routes a text (default: the start of the checkpoint's validation data) and shows per MoE layer
    tokens per expert, imbalance, router entropy, drops at the training capacity and gate weights;
    the text coloured by expert; what each expert receives; expert pairs and paths.

    Example: [bold]minideep inspect-routing runs/20260101-120000-moe --layer 2 --html report.html[/bold] ·
    over training: [bold]minideep inspect-routing runs/20260101-120000-moe --history[/bold]
    """
    if history:
        if text or prompt or html or layer is not None:
            raise UserError("--history reads the training logs; it takes no --text, --prompt, --layer or --html")
        return _routing_history(ckpt, json_out)
    import numpy as np

    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
    from .data import open_or_none, read_text_file
    from .models.transformer import is_moe_layer
    from .routing import Source, analyze, collect_routing, model_info
    from .tokenizer import load_tokenizer, split_chunks, token_bytes
    from .train import pick_device, pick_dtype
    from .views.terminal import render_report

    if text and prompt is not None:
        raise UserError("give --text or --prompt, not both")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    for out in (json_out, html):
        if out is not None:
            writable(out)
    path = resolve_checkpoint(str(ckpt) if ckpt else None)
    state = load_checkpoint(path)
    dev = pick_device(device, "--device")
    model, cfg = model_from_checkpoint(state, dev, path)
    moe_blocks = [i for i in range(cfg.model.n_layer) if cfg.model.arch == "moe" and is_moe_layer(cfg.model, i)]
    if not moe_blocks:
        raise UserError(f"{path} is a dense {cfg.model.arch} model with no experts: there is no routing to inspect "
                        "(sample --show-routing shows its predictions)")
    if layer is not None and layer not in moe_blocks:
        raise UserError(f"--layer {layer} is not an MoE layer; the MoE layers are {', '.join(map(str, moe_blocks))}")
    tok = load_tokenizer(state["tokenizer"])
    if text or prompt is not None:
        body = read_text_file(text) if text else prompt
        ids = []
        for chunk in split_chunks(body, 1 << 16):  # stop encoding once there are enough tokens
            ids += tok.encode(chunk).ids
            if len(ids) > max_tokens:
                break
        source = str(text) if text else "--prompt"
    else:
        dd = open_or_none(cfg)
        if dd is None:
            raise UserError("the checkpoint's training data is not on this machine; give --text or --prompt")
        if dd.tokenizer_json != state["tokenizer"]:
            raise UserError(f"{dd.dir} was tokenized with another tokenizer than this checkpoint's")
        ids, source = dd.val, f"{dd.dir} (validation split)"
    if len(ids) == 0:
        raise UserError("the text is empty: nothing to route")
    tokens = np.asarray(ids[:max_tokens], dtype=np.int64)
    if len(ids) > max_tokens:
        source += f", first {max_tokens:,} tokens"
    console = _console()
    progress = _progress_bar("routing")
    with progress:
        task = progress.add_task("routing", total=len(tokens))
        trace = collect_routing(model, tokens, dev, dtype=pick_dtype(cfg.train.dtype, dev),
                                progress=lambda done, total: progress.update(task, completed=done))
    report = analyze(trace, token_bytes(tok), model_info(cfg, moe_blocks),
                     Source(str(path), source, len(tokens)), layer)
    render_report(console, report)
    if json_out:
        import json

        write_file(json_out, json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
        console.print(f"wrote {json_out}")
    if html:
        from .views.html import render_html

        write_file(html, render_html(report))
        console.print(f"wrote {html}")


def _routing_history(run: Optional[Path], json_out: Optional[Path]) -> None:
    from .checkpoint import newest_run
    from .routing import read_history
    from .views.terminal import render_history

    run = run or newest_run()
    if run is None:
        raise UserError("no run dir given and no runs under ./runs")
    h = read_history(run)
    render_history(_console(), h)
    if json_out:
        import json

        write_file(json_out, json.dumps(h.to_dict(), indent=1) + "\n")


def _progress_bar(what: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    return Progress(f"[bold]{what}", BarColumn(), MofNCompleteColumn(), "tokens", TimeElapsedColumn(), "eta",
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


@app.command()
@guarded
def bench(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option(help="cpu | rtx3060 | a100 | seed; default: picked for this machine.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with model/data/train/sample sections.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="moe (default) or gpt2.")] = None,
    attention: Annotated[Optional[str], typer.Option(help="gqa | mla | latent (moe arch) for the train and memory sections (decode times every variant).")] = None,
    override: Overrides = None,
    section: Annotated[Optional[List[str]], typer.Option("--section", "-s", help="train | moe | decode | memory | "
                       "tokenizer | peers, repeatable; default: all but peers.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repetitions and contexts (under 2 minutes on 2 cores).")] = False,
    estimate_memory: Annotated[bool, typer.Option("--estimate-memory", help="Only predict peak training memory "
                               "(nothing allocated, no device needed).")] = False,
    device_memory: Annotated[Optional[str], typer.Option(help="Say whether the run fits this much, e.g. 12GB or 40GiB.")] = None,
    compare_hf: Annotated[bool, typer.Option("--compare-hf", help="Add the peers section: the same models in "
                          "Hugging Face transformers (needs transformers).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch; default: torch's choice.")] = None,
    vs: Annotated[Optional[List[str]], typer.Option("--vs", help="Also time the training step with these overrides "
                  "(section.key=value, several separated by spaces), interleaved with the plain one; repeatable.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")] = None,
):
    """Measure speed, memory and cache sizes on this machine: medians after warm-up, ratios side by side.

    Examples: [bold]minideep bench --quick[/bold] ·
    [bold]minideep bench --preset cpu --arch gpt2 --compare-hf --json bench.json[/bold] ·
    [bold]minideep bench --preset rtx3060 --estimate-memory --device-memory 12GB[/bold] ·
    [bold]minideep bench -s train -s memory --attention mla[/bold] ·
    what a setting costs: [bold]minideep bench -s train --vs model.dropout=0 --vs train.dtype=bfloat16[/bold]
    """
    import torch

    from .bench import DEFAULT_SECTIONS, BenchOptions, bench_config, json_safe, parse_bytes, run_bench
    from .config import moe_only_keys, resolve_config
    from .views.bench import render_bench

    overrides = list(override or [])
    if attention:
        overrides.append(f"model.attention={attention}")
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(threads)
    if json_file:
        writable(json_file)
    if estimate_memory and ((section and set(section) != {"memory"}) or vs or compare_hf):
        raise UserError("--estimate-memory predicts memory alone: drop it, or drop -s, --vs and --compare-hf")
    name = preset if preset is not None else (None if config else auto_preset())
    cfg = bench_config(resolve_config(name, str(config) if config else None, overrides, arch))
    if any(not v.split() for v in vs or []):
        raise UserError("--vs needs one or more section.key=value overrides, e.g. --vs model.dropout=0")
    variants = {v: bench_config(resolve_config(name, str(config) if config else None, overrides + v.split(), arch))
                for v in vs or []}
    sections = tuple(section or (("memory",) if estimate_memory else DEFAULT_SECTIONS))
    if compare_hf and "peers" not in sections:
        sections += ("peers",)
    if "peers" in sections:  # checked before the other sections run, not after
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise UserError("--compare-hf needs Hugging Face transformers: pip install transformers")
    if variants and "train" not in sections:
        sections = ("train",) + sections
    opts = BenchOptions.for_run(quick, sections, device_memory=parse_bytes(device_memory) if device_memory else None,
                                measure_memory=not estimate_memory)
    peer_cfgs = None
    if "peers" in sections:  # both arches of the preset: GPT2LMHeadModel and MixtralForCausalLM
        peer_cfgs = {a: bench_config(resolve_config(name, str(config) if config else None, overrides if a == cfg.model.arch
                                                    else [o for o in overrides if o.partition("=")[0].strip()
                                                          not in [f"model.{k}" for k in moe_only_keys()]], a))
                     for a in ("gpt2", "moe")}
    console = _console()
    result = run_bench(cfg, opts, name, peer_cfgs, on_event=lambda text: console.print(f"[dim]{text}[/dim]"),
                       variants=variants)
    render_bench(console, result)
    if json_file:
        write_file(json_file, json_safe(result))
        console.print(f"wrote {json_file}")


# ---------------------------------------------------------------- export


@app.command()
@guarded
def export(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file, run dir (its best.pt) or a safetensors export folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created; must be empty unless --force).")],
    fmt: Annotated[str, typer.Option("--format", help="hf (transformers folder) | safetensors (minideep, no pickle).")] = "hf",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT_DIR.")] = False,
):
    """Export a checkpoint: a Hugging Face folder, or plain safetensors + JSON config.

    [bold]--format hf[/bold]: a transformers folder with the tokenizer (gpt2 -> GPT2, moe -> Mixtral, Qwen2-MoE, DeepSeek-V2/V3).
    A configuration with no exactly equal transformers class is refused with the reason.
    [bold]--format safetensors[/bold]: any model, no pickle; eval, sample and inspect-routing accept the folder.

    Example: [bold]minideep export runs/20260101-120000-moe hf/mymoe[/bold], then
    [bold]lm_eval --model hf --model_args pretrained=hf/mymoe --tasks hellaswag[/bold] ·
    [bold]minideep export runs/mine shared/mine --format safetensors[/bold]
    """
    from .checkpoint import resolve_checkpoint
    from .export import export_checkpoint

    res = export_checkpoint(resolve_checkpoint(str(ckpt)), out_dir, fmt, force)
    what = "minideep safetensors export" if res.format == "safetensors" else res.target
    print(f"wrote {res.out_dir} ({what}, {res.params / 1e6:.2f}M parameters): {', '.join(res.files)}")


def main():
    app()
