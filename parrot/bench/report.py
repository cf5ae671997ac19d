"""Markdown table, plot and one-line summary of a benchmark result."""

from __future__ import annotations

from pathlib import Path


def _best(result: dict) -> dict[tuple[float, str], dict]:
    best: dict[tuple[float, str], dict] = {}
    for m in result["measurements"]:
        key = (m["rtt_ms"], m["system"])
        if key not in best or m["mean_s"] < best[key]["mean_s"]:
            best[key] = m
    return best


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"### {result['workload']} ({'quick' if result['quick'] else 'full'})",
        "",
        f"Model {result['model']} on {result['engines']} x {result['engine']} engine(s)"
        f"{' (SIMULATED: a cost model, not the real engine)' if result['simulated'] else ''}; settings {result['config']}; {result['repeats']} repeat(s), best mean shown. "
        f"RTT is added in the benchmark's client only. Paper: {result['config'].get('paper') or '-'}.",
        "",
        "| system | added RTT | mean latency (s) | p90 (s) | slower than parrot |",
        "|---|---|---|---|---|",
    ]
    for (rtt, system), m in sorted(_best(result).items()):
        ratio = result["ratios"][f"{rtt:.0f}ms"][system]
        lines.append(f"| {system} | {rtt:.0f} ms | {m['mean_s']:.2f} | {m['p90_s']:.2f} | {ratio:.2f}x |")
    lines += ["", "Every measured run reads its own documents (engines cache prompt prefixes); a warm-up pair on the same "
              f"documents checks that parrot and request-level produce the same text: {'identical' if result['outputs_match'] else 'DIFFERENT'}."]
    lines += [f"Note: {note}" for note in result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best(result)
    rtts = sorted({rtt for rtt, _ in best})
    systems = sorted({system for _, system in best}, key=lambda s: (s != "parrot", s))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [best[(rtt, system)]["mean_s"] if (rtt, system) in best else 0 for rtt in rtts]
        ax.bar([x + i * width for x in range(len(rtts))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(rtts))], [f"+{r:.0f} ms RTT" for r in rtts])
    ax.set_ylabel("mean app latency (s)")
    ax.set_title(f"{result['workload']} ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(result: dict) -> str:
    parts = []
    for setting, ratios in sorted(result["ratios"].items(), key=lambda kv: float(kv[0][:-2])):
        others = ", ".join(f"{system} {ratio:.2f}x slower" for system, ratio in sorted(ratios.items()) if system != "parrot")
        parts.append(f"+{setting} RTT: parrot 1.00x, {others}")
    return f"{result['workload']}: " + "; ".join(parts)
