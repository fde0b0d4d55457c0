"""Rendering `train`: the live progress bar and eval lines (TrainView, fed the loop's events) and
the summary printed when the run ends."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import count, duration


class TrainView:
    """Renders training events: a rich progress bar with loss and ETA, and one line per eval."""

    def __init__(self, console):
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
                budget.append(count(info['max_steps'], 'step'))
            if info["max_minutes"]:
                budget.append(f"{info['max_minutes']:g} min")
            c.print(f"run dir {info['run_dir']}  device {info['device']} ({info['dtype']})  "
                    f"params {info['params'] / 1e6:.2f}M (active {info['active_params'] / 1e6:.2f}M)  "
                    f"{info['tokens_per_step']:,} tokens/step  budget {' or '.join(budget)}"
                    + (f" (resumed at step {info['step']:,})" if info.get("step") else "")
                    + (f"  {info['world']} ranks ({info['distributed']})" if info.get("world", 1) > 1 else ""))
            if info.get("device") == "cpu" and "threads" in info and info.get("world", 1) == 1:
                c.print(threads_line(info["threads"]))
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
        elif kind == "threads":
            c.print(f"step {info['step']:>6}  {threads_line(info)}")

    def close(self):
        self.bar.stop()


def threads_line(t: dict) -> str:
    """The run's CPU threads and why (train.threads; minideep_cli/threads.py)."""
    line = f"threads {t['threads']} of {t['cpus']} CPUs"
    if t["how"] == "set":
        return line + " (train.threads)"
    if t["how"] == "fixed":
        return line + " (torch's choice; the free cores cannot be read here: set train.threads to choose)"
    return line + (f" (other work keeps {t['others_busy']:.1f} busy; follows the free cores, "
                   "-o train.threads=N to fix)")


def render_result(console, result) -> None:
    """What a finished train prints: where an interrupted run was saved and how to continue it;
    for a completed one, the final bits per byte, the checkpoints and the sample."""
    if result.stopped == "interrupted":
        console.print(f"stopped at step {result.step}; saved {result.run_dir / 'last.pt'} "
                      f"(continue with: minideep train --resume --out {result.run_dir})")
    if result.stopped != "done":
        return
    v = result.val
    console.print(f"done: {count(result.step, 'step')}, {result.tokens:,} tokens in {duration(result.elapsed)}")
    which = f"best checkpoint, step {result.val_step}" if result.val_step != result.step else f"step {result.step}"
    console.print(f"[bold]val bits per byte {v['bpb']:.4f}[/bold]  ({which}; loss {v['loss']:.4f} nats/token, "
                  f"perplexity {v['perplexity']:.2f}, {v['tokens']:,} tokens)")
    console.print(f"checkpoints: {result.run_dir / 'best.pt'}, {result.run_dir / 'last.pt'}")
    if result.sample:
        console.print("[bold]sample:[/bold]")
        console.print(result.sample, markup=False)
