"""parallel-sampling's comparison, tables, plot and summary line."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from rich.console import Console

from parrot.bench.report import markdown_table, print_rows

COLUMNS = ("n", "system", "mean latency (s)", "slower than parrot", "tokens computed a request")


def compare(result: dict) -> list[dict]:
    """Per n: each system's mean latency over its repeats, its ratio to parrot's, and the tokens
    its engines computed a request (where reported)."""
    rows = []
    for n in result["config"]["choices"]:
        means, computed = {}, {}
        for label, measurements in result["results"].items():
            mine = [m for m in measurements if m["n"] == n]
            if mine:
                means[label] = mean(m["latency_s"] for m in mine)
                counts = [m["tokens_computed"] for m in mine if m["tokens_computed"] is not None]
                computed[label] = mean(counts) if counts else None
        parrot = means.get("parrot")
        rows.append({"n": n, "mean_s": means, "tokens_computed": computed,
                     "slower_than_parrot": {label: s / parrot for label, s in means.items()} if parrot else {}})
    return rows


def _rows(result: dict) -> list[tuple[str, ...]]:
    out = []
    for row in result["comparison"]:
        for label, seconds in row["mean_s"].items():
            ratio = row["slower_than_parrot"].get(label)
            tokens = row["tokens_computed"].get(label)
            out.append((str(row["n"]), label, f"{seconds:.2f}", f"{ratio:.2f}x" if ratio else "-", f"{tokens:.0f}" if tokens else "-"))
    return out


def print_table(result: dict, console: Console) -> None:
    config = result["config"]
    print_rows(console, f"parallel-sampling: a {config['prompt_tokens']}-token prompt, n choices of {config['output_tokens']} tokens "
                        f"({result['model']})", COLUMNS, _rows(result))


def write_markdown(result: dict, path: Path) -> None:
    config = result["config"]
    lines = [
        f"### parallel-sampling ({result['size']})",
        "",
        f"Model {result['model']}, one built-in engine per parrot system; a prompt of {config['prompt_tokens']} tokens, each choice "
        f"{config['output_tokens']} tokens (ignore_eos, temperature 1, seeded), {config['repeats']} request(s) per n and system, "
        "each on a prompt of its own; mean latency from sending to the last choice.",
        "",
        *(f"- {label}: {description}" for label, description in result["systems"].items()),
        "",
        *markdown_table(COLUMNS, _rows(result)),
    ]
    lines += [f"Note: {note}" for note in result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["comparison"]
    fig, (latency, tokens) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in result["systems"]:
        points = [(row["n"], row["mean_s"][label]) for row in rows if label in row["mean_s"]]
        latency.plot(*zip(*points), marker="o", label=label)
        counted = [(row["n"], row["tokens_computed"][label]) for row in rows if row["tokens_computed"].get(label)]
        if counted:
            tokens.plot(*zip(*counted), marker="o", label=label)
    latency.set(xlabel="n (choices of one prompt)", ylabel="mean latency (s)", title="time to the last choice")
    tokens.set(xlabel="n (choices of one prompt)", ylabel="tokens computed a request", title="engine work")
    ns = [row["n"] for row in rows]
    for ax in (latency, tokens):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend()
    fig.suptitle(f"parallel-sampling ({result['model']}, {result['config']['prompt_tokens']}-token prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(result: dict) -> str:
    """The ratios at the largest n measured."""
    row = result["comparison"][-1]
    others = ", ".join(f"{label} {ratio:.2f}x slower" for label, ratio in row["slower_than_parrot"].items() if label != "parrot")
    return f"parallel-sampling (n={row['n']}, prompt {result['config']['prompt_tokens']} tokens): parrot 1.00x, {others or 'no baseline ran'}"
