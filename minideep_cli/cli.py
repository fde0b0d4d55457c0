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
    file: Annotated[Optional[Path], typer.Argument(help="UTF-8 text file; default: the bundled tiny Shakespeare.")] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (256 bytes + merges + <|endoftext|>).")] = 2048,
    out: Annotated[Path, typer.Option(help="Output data dir.")] = Path("data/tokens"),
    val_fraction: Annotated[float, typer.Option(help="The last fraction of the text kept for validation.")] = 0.1,
):
    """Train a byte-level BPE and encode a corpus into train/val token files.

    Example: [bold]minideep tokenize input.txt --vocab-size 4096 --out data/mytext[/bold]
    then [bold]minideep train --data data/mytext[/bold].
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    from .data import bundled_corpus, read_text_file, tokenize_text

    if vocab_size < 257:
        raise UserError("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    if not 0 < val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    src = file or bundled_corpus()
    text = read_text_file(src)
    with Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("encoding", total=len(text))
        meta = tokenize_text(text, out, vocab_size, val_fraction, str(src),
                             progress=lambda done, total: bar.update(task, completed=done))
    print(f"wrote {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
          f"({meta['train_bytes']:,} bytes), val {meta['val_tokens']:,} tokens ({meta['val_bytes']:,} bytes)")


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
                    f"{info['tokens_per_step']:,} tokens/step  budget {' or '.join(budget)}")
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
            c.print(f"[red]loss became {info['loss']} at step {info['step']}; stopped. "
                    "The last good checkpoint is intact; try a lower train.lr.[/red]")
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
):
    """Train a model; prints validation bits per byte and a sample at the end.

    Examples: [bold]minideep train[/bold] ·
    [bold]minideep train --arch gpt2 -o train.max_minutes=5[/bold] ·
    [bold]minideep train --preset rtx3060 --data data/mytext --out runs/big[/bold] ·
    [bold]minideep train --resume --out runs/big -o train.max_steps=20000[/bold]
    """
    from .checkpoint import load_checkpoint, newest_run
    from .config import Config, parse_override, resolve_config, set_value, validate
    from .train import train as run_train

    overrides = list(override or [])
    if resume:
        run_dir = out or newest_run()
        if run_dir is None:
            raise UserError("--resume: no run to resume under ./runs; give --out RUN_DIR")
        cfg = Config.from_dict(load_checkpoint(Path(run_dir) / "last.pt")["config"]) if (Path(run_dir) / "last.pt").is_file() \
            else None
        if cfg is None:
            raise UserError(f"--resume: no last.pt in {run_dir}")
        for o in overrides:
            k, v = parse_override(o)
            set_value(cfg, k, v, "overrides")
        if data:
            cfg.data.dir = str(data)
        validate(cfg)
    else:
        cfg = resolve_config(preset or (None if config else auto_preset()), str(config) if config else None,
                             overrides, arch)
        if data:
            cfg.data.dir = str(data)
        run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.arch}"

    console = _console()
    view = TrainView(console)
    try:
        result = run_train(cfg, run_dir, resume=resume, on_event=view)
    finally:
        view.close()
    if result.stopped == "interrupted":
        console.print(f"stopped at step {result.step}; saved {result.run_dir / 'last.pt'} "
                      f"(continue with: minideep train --resume --out {result.run_dir})")
        return
    if result.stopped == "diverged":
        raise typer.Exit(1)
    v = result.val
    console.print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed / 60:.1f} min")
    console.print(f"[bold]val bits per byte {v['bpb']:.4f}[/bold]  (loss {v['loss']:.4f} nats/token, "
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
    dev = pick_device(device)
    model, cfg = model_from_checkpoint(state, dev)
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
):
    """Generate text from a checkpoint, streaming tokens as they come (with a KV cache).

    Example: [bold]minideep sample runs/20260101-120000-moe --prompt "ROMEO:" --temperature 0.7 --top-k 50[/bold]
    """
    import codecs

    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
    from .generate import generate
    from .tokenizer import load_tokenizer, token_bytes
    from .train import pick_device

    if max_new_tokens < 0 or num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    path = resolve_checkpoint(str(ckpt) if ckpt else None)
    state = load_checkpoint(path)
    dev = pick_device(device)
    model, cfg = model_from_checkpoint(state, dev)
    tok = load_tokenizer(state["tokenizer"])
    pieces = token_bytes(tok)
    prompt_ids = tok.encode(prompt).ids
    g = torch.Generator(device=dev).manual_seed(seed)
    for n in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {n + 1}")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(prompt)
        for i in generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, g, not no_cache, dev):
            sys.stdout.write(decoder.decode(pieces[i]))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")


# ---------------------------------------------------------------- not yet available


@app.command("inspect-routing")
@guarded
def inspect_routing(ctx: typer.Context, ckpt: Annotated[Optional[Path], typer.Argument()] = None):
    """(not yet available) See which experts each token uses: terminal, live, HTML report.

    Example (once available): [bold]minideep inspect-routing runs/20260101-120000-moe --html report.html[/bold]
    """
    raise UserError("inspect-routing is not yet available in this version")


@app.command()
@guarded
def bench(ctx: typer.Context):
    """(not yet available) Measure speed, memory and cache sizes on this machine.

    Example (once available): [bold]minideep bench --quick[/bold]
    """
    raise UserError("bench is not yet available in this version")


def main():
    app()
