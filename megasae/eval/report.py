"""report.md: eval.json as tables a person reads, one section per target, a column per token group."""

from __future__ import annotations

ROWS = (
    ("tokens", "tokens read", "{:.0f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("mse", "MSE", "{:.4g}"),
    ("cosine_similarity", "cosine similarity", "{:.4f}"),
    ("relative_norm", "relative norm", "{:.4f}"),
    ("l0", "mean L0", "{:.2f}"),
    ("dead_fraction", "dead", "{:.2%}"),
    ("dense_fraction", "dense (> 10% of tokens)", "{:.2%}"),
    ("predictions", "next-token predictions", "{:.0f}"),
    ("ce_clean", "CE clean", "{:.4f}"),
    ("ce_spliced", "CE spliced", "{:.4f}"),
    ("ce_ablated", "CE zero-ablated", "{:.4f}"),
    ("loss_recovered", "loss recovered", "{:.4f}"),
    ("kl_clean_spliced", "KL(clean ‖ spliced) per token", "{:.4f}"),
)


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def report_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# megasae eval",
        "",
        f"- model: `{result['model']}`",
        f"- adapter: `{result['adapter']}`",
        (f"- data: `{result['data']}`: {result['tokens']} tokens in {result['sequences']} sequences "
         f"(ctx_len {s['ctx_len']}, seed {s['seed']}, tokens {s['tokens']}, "
         f"outlier factor {s['outlier_factor']})"),
        "",
        ("Each SAE reads the tokens of the token mask (no padding, position 0 or special tokens, no norm "
         "outliers); host losses score the next-token predictions made at those positions, with only that "
         "target replaced there by its reconstruction (spliced) or by zeros (ablated). Loss recovered = "
         "(CE ablated − CE spliced) / (CE ablated − CE clean)."),
        "",
    ]
    for path, target in result["targets"].items():
        groups = target["groups"]
        lines += [f"## `{path}`: {target['num_latents']} latents, k = {target['k']}", "",
                  "| | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for key, label, fmt in ROWS:
            lines.append(f"| {label} | " + " | ".join(_cell(g[key], fmt) for g in groups.values()) + " |")
        by_prefix = [{str(m): fvu for m, fvu in g.get("prefix_fvu", {}).items()} for g in groups.values()]
        for m in sorted({m for prefixes in by_prefix for m in prefixes}, key=int):  # a Matryoshka SAE's
            cells = " | ".join(_cell(prefixes.get(m), "{:.4f}") for prefixes in by_prefix)
            lines.append(f"| FVU of latents < {m} | {cells} |")
        lines.append("")
    lines += ["![latent firing density](density.png)", "", "![L0 distribution](l0.png)", ""]
    return "\n".join(lines)
