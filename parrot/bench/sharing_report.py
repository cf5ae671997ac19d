"""Tables, plots and the one-line summary of a prefix-sharing workload."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from parrot.bench.report import markdown_table, print_rows, size_of


def sustained_load(rows: list[dict], slo_s_per_token: float) -> float:
    """The highest load up to which every load keeps the mean latency per output token within the SLO (0: none)."""
    sustained = 0.0
    for row in sorted(rows, key=lambda r: r["load"]):
        if row["s_per_output_token"] > slo_s_per_token:
            break
        sustained = row["load"]
    return sustained


def compare(result: dict) -> dict:
    """Per system: how many times parrot's throughput and latency per token are better, at each load;
    for rate workloads also the highest rate each sustains within the SLO."""
    config, results = result["config"], result["results"]
    parrot = {row["load"]: row for row in results.get("parrot", [])}
    out: dict = {}
    for label, rows in results.items():
        by_load = {}
        for row in rows:
            base = parrot.get(row["load"])
            if base is not None:
                by_load[f"{row['load']:g}"] = {
                    "throughput_x": base["throughput_tokens_s"] / row["throughput_tokens_s"],
                    "latency_x": row["s_per_output_token"] / base["s_per_output_token"],
                    "peak_batch_blocks": row["peak_batch_blocks"],
                }
        out[label] = {"by_load": by_load}
        if config["load_kind"] == "requests/s":
            out[label]["sustained_load"] = sustained_load(rows, config["slo_s_per_token"])
    return out


def _unit(result: dict) -> str:
    return result["config"]["load_kind"]


def sharing_columns(result: dict) -> tuple[str, ...]:
    return ("system", _unit(result), "latency per output token (ms)", "throughput (tokens/s)", "peak batch KV blocks",
            "parrot lower latency by")


def sharing_rows(result: dict) -> list[tuple[str, ...]]:
    out = []
    for label, rows in result["results"].items():
        for row in rows:
            cmp = result["comparison"][label]["by_load"].get(f"{row['load']:g}", {})
            blocks = row["peak_batch_blocks"] if row["peak_batch_blocks"] is not None else "-"
            out.append((label, f"{row['load']:g}", f"{row['s_per_output_token'] * 1e3:.0f}", f"{row['throughput_tokens_s']:.1f}",
                        str(blocks), f"{cmp.get('latency_x', 0):.2f}x"))
    return out


def print_sharing_table(result: dict, console: Console) -> None:
    print_rows(console, f"{result['workload']} ({size_of(result)}, {result['model']})",
               sharing_columns(result), sharing_rows(result))


def write_sharing_markdown(result: dict, path: Path) -> None:
    config = result["config"]
    lines = [
        f"### {result['workload']} ({size_of(result)})",
        "",
        f"Model {result['model']}, one engine per system, each its own server fed the same requests. System prompts "
        f"{config['system_prompt_tokens']} tokens (mix {config['app_mix']}), queries {config['query_tokens']} tokens, "
        f"{config['output_tokens']} output tokens (ignore_eos). Paper: {config['paper'] or '-'}.",
        "",
        *[f"- **{label}**: {text}" for label, text in result["systems"].items()],
        "",
        *markdown_table(sharing_columns(result), sharing_rows(result)),
    ]
    if config["load_kind"] == "requests/s":
        lines += ["", f"Highest rate sustained with mean latency per output token within {config['slo_s_per_token'] * 1e3:.0f} ms: "
                  + ", ".join(f"{label} {c['sustained_load']:g} req/s" for label, c in result["comparison"].items()) + "."]
    lines += ["", "Peak batch KV blocks: the most distinct KV blocks one forward step's batch read, cumulative over the run. "
              "Greedy outputs of the warm-up (each app once) equal parrot's (where two tokens nearly tie they can differ: "
              "steps of at most two rows use the bf16 copy of the weights, so the path a prompt took can tip the tie): "
              + ", ".join(f"{label} {'yes' if same else 'NO'}" for label, same in result["outputs_match"].items()) + "."]
    lines += [f"Note: {note}" for note in result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def plot_sharing(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency_ax, throughput_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in result["results"].items():
        loads = [row["load"] for row in rows]
        latency_ax.plot(loads, [row["s_per_output_token"] * 1e3 for row in rows], marker="o", label=label)
        throughput_ax.plot(loads, [row["throughput_tokens_s"] for row in rows], marker="o", label=label)
    if result["config"]["load_kind"] == "requests/s":
        latency_ax.axhline(result["config"]["slo_s_per_token"] * 1e3, color="grey", linestyle="--", linewidth=1, label="SLO")
    loads = sorted({row["load"] for rows in result["results"].values() for row in rows})
    for ax, ylabel in ((latency_ax, "latency per output token (ms)"), (throughput_ax, "throughput (output tokens/s)")):
        ax.set_xlabel(_unit(result))
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(loads, [f"{load:g}" for load in loads])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    latency_ax.set_yscale("log")
    latency_ax.legend(fontsize=8)
    fig.suptitle(f"{result['workload']} ({result['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sharing_summary(result: dict) -> str:
    cmp, results = result["comparison"], result["results"]
    others = [label for label in results if label != "parrot"]
    if result["config"]["load_kind"] == "requests/s":
        rate = cmp["parrot"]["sustained_load"]
        parts = [f"{label} {rate / cmp[label]['sustained_load']:.1f}x" if cmp[label]["sustained_load"] else f"{label} sustains no rate"
                 for label in others]
        return (f"{result['workload']}: parrot sustains {rate:g} req/s within {result['config']['slo_s_per_token'] * 1e3:.0f} ms/token, "
                f"that rate over: " + ", ".join(parts))
    top = f"{results['parrot'][-1]['load']:g}"
    parts = [f"{label} {cmp[label]['by_load'][top]['latency_x']:.2f}x slower" for label in others if top in cmp[label]["by_load"]]
    return f"{result['workload']} ({top} {_unit(result)}): parrot 1.00x, " + ", ".join(parts)
