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
from .errors import UserError, first_line
from .files import prints_to_stdout, writable, write_output

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
            first = first_line(e)
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


def _console(*outputs: Optional[Path]):
    """The console for what a command shows; stderr when one of its outputs (--json -) is stdout."""
    from rich.console import Console

    return Console(stderr=any(o is not None and prints_to_stdout(o) for o in outputs), highlight=False)


# ---------------------------------------------------------------- tokenize


@app.command()
@guarded
def tokenize(
    ctx: typer.Context,
    files: Annotated[Optional[List[Path]], typer.Argument(
        help="Text, JSONL or parquet files, or folders (every text file in them, whatever its extension); "
             "default: the bundled tiny Shakespeare.")] = None,
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
        help="Sharded: tokens of the validation shard; default: random whole documents, about 10%, at most 10M.")] = None,
    tokenizer_sample_bytes: Annotated[Optional[int], typer.Option(
        help="Sharded: train the tokenizer on the first this many bytes of text; default: 100M.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Sharded: stop after this many tokens in all.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Encoding processes; default: CPU cores - 1.")] = None,
    include: Annotated[Optional[List[str]], typer.Option(
        help="Folders: read only files matching this glob (repeatable; '*.py' matches at any depth).")] = None,
    exclude: Annotated[Optional[List[str]], typer.Option(
        help="Folders: leave out files matching this glob (repeatable; wins over --include).")] = None,
    seed: Annotated[int, typer.Option(help="Sharded: the seed of the document order and validation sample.")] = 1337,
    shuffle: Annotated[bool, typer.Option(
        "--shuffle/--no-shuffle", help="Sharded: documents in a seeded random order (validation a random "
        "sample of them), or in the order given (files sorted within folders).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace a data dir made from other text or settings, "
                                        "or write into a folder holding other files.")] = False,
):
    """Train a byte-level BPE and encode a corpus into train/val token files.

    One text file gives train.bin/val.bin (validation = the last 10%). Many documents (several
    files, folders, JSONL, parquet, --dataset) give token shards, each document after an
    <|endoftext|>, in a seeded random order; validation is a random sample of whole documents
    (about 10% of the tokens, at most 10M). A folder means every UTF-8 text file below it
    (code, markdown, no extension alike); binary, undecodable and hidden files are skipped and
    counted in the summary. Rerunning an interrupted command resumes at the last complete shard.
    An --out holding other data (which runs may have trained on) is refused without --force.

    Example: [bold]minideep tokenize input.txt --vocab-size 4096 --out data/mytext[/bold]
    then [bold]minideep train --data data/mytext[/bold] ·
    [bold]minideep tokenize ~/code/myproject --exclude '*.min.js' --out data/mycode[/bold] ·
    [bold]minideep tokenize --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --vocab-size 32768 --out data/fineweb[/bold]
    """
    from .data import tokenize_corpus
    from .views.tokenize import TokenizeView, tokenize_summary

    view = TokenizeView()
    try:
        meta = tokenize_corpus(out, files, dataset, vocab_size, val_fraction, view, name=name, split=split,
                               text_column=text_column, shard_tokens=shard_tokens, val_tokens=val_tokens,
                               tokenizer_sample_bytes=tokenizer_sample_bytes, max_tokens=max_tokens, workers=workers,
                               force=force, include=tuple(include or ()), exclude=tuple(exclude or ()), seed=seed,
                               shuffle=shuffle)
    finally:
        view.close()
    print(tokenize_summary(out, meta))


# ---------------------------------------------------------------- train


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
    new_data: Annotated[bool, typer.Option("--new-data", help="With --resume: go on training on data other than "
                                           "the run's (the best checkpoint then starts over).")] = False,
):
    """Train a model; prints validation bits per byte and a sample at the end.

    Examples: [bold]minideep train[/bold] ·
    [bold]minideep train --arch gpt2 -o train.max_minutes=5[/bold] ·
    [bold]minideep train --preset rtx3060 --data data/mytext --out runs/big[/bold] ·
    [bold]minideep train --resume --out runs/big -o train.max_steps=20000[/bold] ·
    [bold]torchrun --nproc_per_node=4 -m minideep_cli train --data data/fineweb -o train.distributed=fsdp[/bold]
    """
    from .config import resolve_config
    from .device import default_preset
    from .train import StoppedUnsaved, resume_config, train as run_train
    from .views.train import TrainView, render_result

    overrides, ckpt = list(override or []), None
    if new_data and not resume:
        raise UserError("--new-data goes with --resume (a new run trains on whatever --data gives)")
    if resume:
        given = [flag for flag, v in (("--preset", preset), ("--config", config), ("--arch", arch)) if v is not None]
        if given:
            raise UserError(f"--resume continues the run's saved config: {', '.join(given)} cannot change it "
                            "(-o train.KEY=VALUE can, e.g. -o train.max_steps=20000)")
        run_dir, cfg, ckpt = resume_config(out, overrides, data)
    else:
        cfg = resolve_config(default_preset(preset, config), str(config) if config else None, overrides, arch)
        if data:
            cfg.data.dir = str(data)
        run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.arch}"
    console = _console()
    view = TrainView(console)
    try:
        try:
            result = run_train(cfg, run_dir, resume=resume, on_event=view, force=force, checkpoint=ckpt, new_data=new_data)
        finally:
            view.close()
    except StoppedUnsaved as e:  # the exit code a shell gives a process that signal ended
        if ctx.obj and ctx.obj.get("debug"):
            raise
        _err(str(e))
        raise typer.Exit(128 + e.signum)
    if result.main:  # under torchrun, rank 0 reports for every rank
        render_result(console, result)
    if result.stopped != "done":  # as a shell reports a process a signal ended: 130 SIGINT, 143 SIGTERM
        raise typer.Exit(1 if result.stopped == "diverged" else 128 + (result.signal or 2))


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
    from .inference import evaluate_checkpoint
    from .schema import json_text

    res = evaluate_checkpoint(ckpt, text, data, device)
    if json_out:
        print(json_text(res))  # a number that is not finite is null
    else:
        print(f"{res['checkpoint']} on {res['source']}: loss {res['loss']:.4f} nats/token  "
              f"perplexity {res['perplexity']:.2f}  bits per byte {res['bpb']:.4f}  ({res['tokens']:,} tokens, {res['bytes']:,} bytes)")


# ---------------------------------------------------------------- sample


@app.command()
@guarded
def sample(
    ctx: typer.Context,
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint file or run dir; default: newest run in runs/.")] = None,
    prompt: Annotated[str, typer.Option(help="Text to continue.", show_default="a newline")] = "\n",
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

    from .config import SampleConfig, validate_sample
    from .generate import generate
    from .inference import load_for_inference
    from .tokenizer import token_bytes

    validate_sample(SampleConfig(prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples),
                    lambda name: "--" + name.replace("_", "-"))
    lo = load_for_inference(ckpt, device)
    model, dev = lo.model, lo.device
    pieces = token_bytes(lo.tokenizer)
    prompt_ids = lo.tokenizer.encode(prompt).ids
    g = torch.Generator(device=dev).manual_seed(seed)
    if show_routing or plain:
        return _sample_routing(model, lo.config, pieces, prompt, prompt_ids, max_new_tokens, num_samples, plain,
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
    from .inference import moe_layers
    from .models import has_experts
    from .routing_report import summarize_step, vocab_texts
    from .views.live import LivePanel, plain_line

    vocab_text = vocab_texts(pieces)
    moe = has_experts(cfg.model)
    n_experts = cfg.model.n_experts if moe else 0
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

        panel = LivePanel(prompt, vocab_text, moe_layers(cfg.model), n_experts, max_new_tokens, note)
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
    from .inference import route_checkpoint
    from .views.progress import TokenBar
    from .views.terminal import render_report

    if text and prompt is not None:
        raise UserError("give --text or --prompt, not both")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    for out in (json_out, html):
        if out is not None:
            writable(out)
    console = _console(json_out, html)
    bar = TokenBar("routing")
    try:
        report = route_checkpoint(ckpt, text, prompt, layer, max_tokens, device, progress=bar)
    finally:
        bar.close()
    render_report(console, report)
    if json_out:
        from .schema import json_text

        write_output(json_out, json_text(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
        _wrote(console, json_out)
    if html:
        from .views.html import render_html

        write_output(html, render_html(report))
        _wrote(console, html)


def _routing_history(run: Optional[Path], json_out: Optional[Path]) -> None:
    from .checkpoint import newest_run
    from .routing_report import read_history
    from .views.terminal import render_history

    run = run or newest_run()
    if run is None:
        raise UserError("no run dir given and no runs under ./runs")
    if json_out:
        writable(json_out)
    h = read_history(run)
    render_history(_console(json_out), h)
    if json_out:
        from .schema import json_text

        write_output(json_out, json_text(h.to_dict(), indent=1) + "\n")


def _wrote(console, path: Path) -> None:
    if not prints_to_stdout(path):
        console.print(f"wrote {path}")


@app.command()
@guarded
def bench(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option(help="cpu | rtx3060 | a100 | seed; default: picked for this machine.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with model/data/train/sample sections.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="moe (default) or gpt2.")] = None,
    attention: Annotated[Optional[str], typer.Option(help="gqa | mla | latent (moe arch) for the train and memory sections (decode times every variant).")] = None,
    override: Overrides = None,
    section: Annotated[Optional[List[str]], typer.Option("--section", "-s", help="train | busy | products | moe | decode | "
                       "memory | tokenizer | peers, repeatable; default: all but products and peers.")] = None,
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

    from .bench import json_safe, run_bench
    from .bench.plan import bench_plan
    from .views.bench import render_bench

    if threads is not None:
        import os

        if not 1 <= threads <= (os.cpu_count() or 1):
            raise UserError(f"--threads must be from 1 to this machine's {os.cpu_count() or 1} CPU cores, got {threads:,}")
        torch.set_num_threads(threads)
    if json_file:
        writable(json_file)
    overrides = list(override or []) + ([f"model.attention={attention}"] if attention else [])
    plan = bench_plan(preset, config, arch, overrides, section, quick, estimate_memory, device_memory, compare_hf, vs)
    console = _console(json_file)
    result = run_bench(plan.cfg, plan.opts, plan.preset, plan.peers,
                       on_event=lambda text: console.print(f"[dim]{text}[/dim]"), variants=plan.variants)
    render_bench(console, result)
    if json_file:
        write_output(json_file, json_safe(result))
        _wrote(console, json_file)


# ---------------------------------------------------------------- export


@app.command()
@guarded
def export(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file, run dir (its best.pt) or a safetensors export folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created; must be empty unless --force); "
                                            "for --format gguf, the .gguf file.")],
    fmt: Annotated[str, typer.Option("--format", help="hf (transformers folder) | safetensors (minideep, no pickle) | "
                                     "gguf (one file for llama.cpp, Ollama, LM Studio).")] = "hf",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT_DIR (an existing .gguf file).")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="--format gguf: f32 (exact, the default) | f16 | bf16 | q8_0.")] = None,
):
    """Export a checkpoint: a Hugging Face folder, plain safetensors + JSON config, or a GGUF file.

    [bold]--format hf[/bold]: a transformers folder with the tokenizer (gpt2 -> GPT2, moe -> Mixtral, Qwen2-MoE, DeepSeek-V2/V3).
    [bold]--format gguf[/bold]: one file with the tokenizer for llama.cpp (gpt2 -> gpt2, moe -> glm4moe, mla -> deepseek2).
    A configuration with no exactly equal class or llama.cpp architecture is refused with the reason.
    [bold]--format safetensors[/bold]: any model, no pickle; eval, sample and inspect-routing accept the folder.

    Example: [bold]minideep export runs/20260101-120000-moe hf/mymoe[/bold], then
    [bold]lm_eval --model hf --model_args pretrained=hf/mymoe --tasks hellaswag[/bold] ·
    [bold]minideep export runs/mine shared/mine --format safetensors[/bold] ·
    [bold]minideep export runs/mine mine.gguf --format gguf --dtype q8_0[/bold], then [bold]llama-completion -m mine.gguf -p "ROMEO:"[/bold]
    """
    from .checkpoint import resolve_checkpoint
    from .export import export_checkpoint

    res = export_checkpoint(resolve_checkpoint(str(ckpt)), out_dir, fmt, force, dtype)
    if res.format == "gguf":
        print(f"wrote {res.out_dir} (llama.cpp {res.target}, {dtype or 'f32'}, {res.params / 1e6:.2f}M parameters, "
              f"{res.out_dir.stat().st_size / 1e6:.1f} MB)")
        return
    what = "minideep safetensors export" if res.format == "safetensors" else res.target
    print(f"wrote {res.out_dir} ({what}, {res.params / 1e6:.2f}M parameters): {', '.join(res.files)}")


def main():
    app()
