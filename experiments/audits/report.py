"""Tables and a plot from ``rows.jsonl`` (written by ``run.py``): ``results.md`` and ``results.png`` here.

python experiments/audits/report.py
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT_MB = 50  # the bound: blacklisted within 50 micro-batches of the first tampered tensor
POSITIONS = [("forward", "first"), ("forward", "middle"), ("backward", "middle"), ("backward", "last")]


def load(path: str) -> List[dict]:
    rows: Dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            key = json.dumps({k: row.get(k) for k in _JOB_KEYS}, sort_keys=True)
            rows[key] = row  # a re-run of the same job replaces the older row
    return list(rows.values())


_JOB_KEYS = (
    "kind",
    "attack",
    "stage",
    "direction",
    "position",
    "collude",
    "ramp",
    "magnitude",
    "stages",
    "replicas",
    "insiders",
    "mode",
    "microbatches",
)


def _cell(row: Optional[dict]) -> str:
    """Each attacker's micro-batches from its first tampered tensor to its blacklisting (its verdict's reason),
    bold when late or missing; honest peers blacklisted, if any."""
    if row is None:
        return "-"
    if "error" in row:
        return f"error: {row['error'][:60]}"
    parts = []
    for name, a in sorted(row["attackers"].items()):
        mb = a["mb_to_blacklist"]
        if a["tampered"] == 0:
            text = f"{name}: never tampered"
        elif mb is None:
            text = f"**{name}: not blacklisted** ({a['tampered']} tampered)"
        else:
            text = f"{name}: {mb}" if mb <= LIMIT_MB else f"**{name}: {mb}**"
        parts.append(text)
    if row["honest_blacklisted"]:
        parts.append(f"**honest blacklisted: {', '.join(row['honest_blacklisted'])}**")
    if row.get("dropped"):
        parts.append(f"{row['dropped']} dropped")
    return "; ".join(parts)


def _met(row: Optional[dict]) -> bool:
    if row is None or "error" in row or row["honest_blacklisted"]:
        return False
    return all(
        a["tampered"] == 0 or (a["mb_to_blacklist"] is not None and a["mb_to_blacklist"] <= LIMIT_MB)
        for a in row["attackers"].values()
    )


def sweep_table(rows: List[dict], ramps: bool) -> List[str]:
    out = ["| attack | " + " | ".join(f"{d} at the {p} stage" for d, p in POSITIONS) + " |"]
    out.append("| --- " * (len(POSITIONS) + 1) + "|")
    keyed = {
        (r["attack"], r["direction"], r["position"], r["collude"]): r
        for r in rows
        if r["kind"] == "sweep" and bool(r.get("ramp")) == ramps and r.get("stages", 4) == 4
    }
    attacks = sorted(
        {k[0] for k in keyed}, key=lambda a: list(dict.fromkeys(r.get("attack") for r in rows)).index(a)
    )
    for attack in attacks:
        for collude in (False, True):
            if not any((attack, d, p, collude) in keyed for d, p in POSITIONS):
                continue
            label = f"{attack}{' x' + str(keyed_any(keyed, attack)['magnitude']) + ' ramp' if ramps else ''}"
            label += " + colluding neighbour" if collude else ""
            cells = [_cell(keyed.get((attack, d, p, collude))) for d, p in POSITIONS]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def keyed_any(keyed: dict, attack: str) -> dict:
    return next(r for k, r in keyed.items() if k[0] == attack)


def convergence_table(rows: List[dict]) -> List[str]:
    conv = [r for r in rows if r["kind"] == "convergence" and "error" not in r]
    clean = next((r for r in conv if r["attack"] == "none"), None)
    if clean is None:
        return ["(no clean run)"]
    base = clean["eval_loss"]
    out = [
        f"Clean run (statistics + audits): held-out loss {base:.4f}, {clean['dropped']} dropped, honest blacklisted: "
        f"{', '.join(clean['honest_blacklisted']) or 'none'}.",
        "",
        "| attack | defences off | statistics only | statistics + audits | within 2% (audits)? | audits: dropped,"
        " honest blacklisted, attackers' micro-batches to blacklist |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    attacks = list(dict.fromkeys(r["attack"] for r in conv if r["attack"] != "none"))
    for attack in attacks:
        by_mode = {r["mode"]: r for r in conv if r["attack"] == attack}
        ratio = {m: by_mode[m]["eval_loss"] / base for m in by_mode}
        audits = by_mode.get("audits")
        within = "yes" if audits and ratio["audits"] <= 1.02 else "**no**"
        detail = ""
        if audits:
            mbs = ", ".join(
                f"{n} {a['mb_to_blacklist'] if a['mb_to_blacklist'] is not None else 'never'}"
                for n, a in sorted(audits["attackers"].items())
            )
            detail = f"{audits['dropped']}; {', '.join(audits['honest_blacklisted']) or 'none'}; {mbs}"
        cells = [f"{ratio[m]:.4f}" if m in ratio else "-" for m in ("off", "stats", "audits")]
        out.append(f"| {attack} | " + " | ".join(cells) + f" | {within} | {detail} |")
    return out


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = [r for r in rows if r["kind"] == "convergence" and "error" not in r]
    clean = next((r for r in conv if r["attack"] == "none"), None)
    if clean is None:
        return
    attacks = list(dict.fromkeys(r["attack"] for r in conv if r["attack"] != "none"))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for i, (mode, label) in enumerate(
        [("off", "defences off"), ("stats", "statistics only"), ("audits", "statistics + audits")]
    ):
        values = [
            next(
                (r["eval_loss"] / clean["eval_loss"] for r in conv if r["attack"] == a and r["mode"] == mode),
                0,
            )
            for a in attacks
        ]
        ax.bar([j + (i - 1) * width for j in range(len(attacks))], values, width, label=label)
    ax.axhline(1.02, color="k", linestyle="--", linewidth=0.8, label="clean + 2%")
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("final held-out loss / clean")
    ax.set_ylim(0.9, max(1.1, ax.get_ylim()[1]))
    ax.set_title("4 stages x 4 replicas, one Byzantine peer per stage (25%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    rows = load(os.path.join(HERE, "rows.jsonl"))
    sweep = [r for r in rows if r["kind"] == "sweep" and not r.get("ramp") and r.get("stages", 4) == 4]
    ramps = [r for r in rows if r["kind"] == "sweep" and r.get("ramp")]
    big = [r for r in rows if r["kind"] == "slander" or r.get("stages", 4) != 4]
    lines = ["# Recomputation audits: results", ""]
    met = sum(map(_met, sweep))
    lines += [
        "## Every attack at every stage position, alone and with a colluding neighbour (4 stages x 3 replicas)",
        "",
        f"Micro-batches from each attacker's first tampered tensor to its blacklisting (bold: over {LIMIT_MB}, or never). "
        f"Met (every attacker within {LIMIT_MB}, no honest peer blacklisted): **{met} of {len(sweep)} runs**.",
        "",
        *sweep_table(rows, ramps=False),
        "",
        "## Slow ramps (500 tampered messages from nothing to full strength)",
        "",
        f"Met: **{sum(map(_met, ramps))} of {len(ramps)} runs**.",
        "",
        *sweep_table(rows, ramps=True),
        "",
        "## 176 workers (8 stages x 22 replicas) and insider slander",
        "",
        "| run | result | blacklisted | dropped | audits |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in big:
        if "error" in r:
            lines.append(
                f"| {r['kind']} {r.get('stages')}x{r.get('replicas')} | error: {r['error'][:80]} | | | |"
            )
            continue
        shape = f"{r.get('stages', 4)}x{r.get('replicas', 3)}"
        if r["kind"] == "slander":
            what = f"insider slander ({r['insiders']} insiders per side + 8 vouching Sybils), {shape}"
            result = "honest blacklisted: " + (", ".join(r["honest_blacklisted"]) or "none")
            bl = ", ".join(r["final_blacklist"]) or "none"
        else:
            what = f"{r['attack']} {r['direction']} at the {r['position']} stage, {shape}"
            result = _cell(r)
            bl = ""
        ev = r.get("evidence", {})
        lines.append(
            f"| {what} | {result} | {bl} | {r['dropped']} | {ev.get('audits', 0)} run, "
            f"{ev.get('accusations', 0)} accusations, {ev.get('proven', 0)} proven |"
        )
    lines += ["", "## Convergence: 4 stages x 4 replicas, 25% Byzantine", "", *convergence_table(rows), ""]
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(lines))
    plot(rows, os.path.join(HERE, "results.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
