"""How well the engine's per-object confidence ranks frames by their true J.

Reads the per frame and object rows that the simulated annotator writes (every round's
confidence, J and flag), so the calibration costs no propagation of its own:

    napari-stm bench annotate ../shared/data/ctc-sim-01 ../shared/data/davis2016-dev/swing \\
        --frames-csv /tmp/frames.csv --csv /tmp/rounds.csv
    python benchmarks/calibrate_confidence.py /tmp/frames.csv --plot docs/images/confidence.png

Prints, per sequence and over all of them, Spearman's rank correlation of confidence with true
J per frame (a frame: the mean over its objects of both) and per frame and object, for the
state after round 0 (one reference, the first frame) and after the last round (frames between
two references fused from both sides); references are left out (both are 1 there by
construction). Also how often the frame of lowest confidence is among the worst 10% by J, and
the J of frames flagged lost against the others.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["round"], r["frame"], r["object"] = int(r["round"]), int(r["frame"]), int(r["object"])
        r["confidence"], r["j"] = float(r["confidence"]), float(r["j"])
    return rows


def states(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(sequence, 'round 0' | 'last round <picker>') -> rows of that state, references left out."""
    by: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["sequence"], r["picker"], r["round"])].append(r)
    out: dict[tuple[str, str], list[dict]] = {}
    for seq in dict.fromkeys(r["sequence"] for r in rows):
        out[(seq, "round 0")] = [r for r in by[(seq, "-", 0)] if r["flag"] != "reference"]
        for picker in ("tool", "oracle", "even"):
            rounds = [k[2] for k in by if k[0] == seq and k[1] == picker]
            if rounds:
                last = max(rounds)
                out[(seq, f"round {last} {picker}")] = [
                    r for r in by[(seq, picker, last)] if r["flag"] != "reference"
                ]
    return out


def per_frame(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    frames: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        frames[r["frame"]].append(r)
    ts = sorted(frames)
    conf = np.array([np.mean([r["confidence"] for r in frames[t]]) for t in ts])
    j = np.array([np.mean([r["j"] for r in frames[t]]) for t in ts])
    return conf, j


def rho(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def report(rows: list[dict]) -> list[tuple]:
    table = []
    for (seq, state), rs in states(rows).items():
        if not rs:
            continue
        conf, j = per_frame(rs)
        worst = j <= np.quantile(j, 0.1)
        hit = bool(worst[int(np.argmin(conf))])
        oc = np.array([r["confidence"] for r in rs])
        oj = np.array([r["j"] for r in rs])
        lost = np.array([r["flag"] == "lost" for r in rs])
        table.append(
            (
                seq,
                state,
                len(conf),
                rho(conf, j),
                len(rs),
                rho(oc, oj),
                hit,
                int(lost.sum()),
                float(oj[lost].mean()) if lost.any() else float("nan"),
                float(oj[~lost].mean()),
            )
        )
    return table


def print_table(table: list[tuple]) -> None:
    print(
        f"{'sequence':16} {'state':18} {'frames':>6} {'rho frame':>9} {'objects':>7} "
        f"{'rho obj':>7} {'least sure in worst 10%':>23} {'lost':>5} {'J lost':>6} {'J other':>7}"
    )
    for seq, state, nf, rf, no, ro, hit, nl, jl, jo in table:
        print(
            f"{seq:16} {state:18} {nf:6d} {rf:9.2f} {no:7d} {ro:7.2f} {str(hit):>23} {nl:5d} "
            f"{jl:6.2f} {jo:7.2f}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = states(rows)
    seqs = list(dict.fromkeys(s for s, _ in st))
    fig, axes = plt.subplots(2, len(seqs), figsize=(3.6 * len(seqs), 6.4), squeeze=False)
    for col, seq in enumerate(seqs):
        rs = st[(seq, "round 0")]
        conf, j = per_frame(rs)
        ax = axes[0][col]
        oc = [r["confidence"] for r in rs]
        oj = [r["j"] for r in rs]
        ax.scatter(oc, oj, s=4, alpha=0.25, color="tab:gray", label="frame x object")
        ax.scatter(conf, j, s=12, color="tab:blue", label="frame (mean)")
        ax.set_title(
            f"{seq}\nrho frame {rho(conf, j):.2f}, object {rho(np.array(oc), np.array(oj)):.2f}",
            fontsize=9,
        )
        ax.set_xlabel("confidence")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        if col == 0:
            ax.set_ylabel("true J")
            ax.legend(fontsize=7, loc="lower right")
        ax = axes[1][col]
        ts = sorted({r["frame"] for r in rs})
        ax.plot(ts, j, label="true J", color="tab:green")
        ax.plot(ts, conf, label="confidence", color="tab:blue")
        ax.set_xlabel("frame (round 0: first frame annotated)")
        ax.set_ylim(-0.02, 1.02)
        if col == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "frames_csv", type=Path, nargs="+", help="written by napari-stm bench annotate --frames-csv"
    )
    p.add_argument("--plot", type=Path, default=None, help="also save the figure (PNG)")
    args = p.parse_args(argv)
    rows = [r for path in args.frames_csv for r in read_rows(path)]
    table = report(rows)
    print_table(table)
    r0 = [t for t in table if t[1] == "round 0"]
    print(
        f"round 0, mean over {len(r0)} sequences: rho frame "
        f"{np.nanmean([t[3] for t in r0]):.2f}, rho object {np.nanmean([t[5] for t in r0]):.2f}"
    )
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
