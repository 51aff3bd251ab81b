"""Run transformers' own model tests dense and with a keep-all session of each vtprune method; tabulate the results.

    python -m tests.peer.run [--families llava qwen2_vl ...] [--methods fastv ...] [--out out/peer]
                             [--transformers-src PATH --transformers-rev REV] [-k EXPR] [--jobs 2]

Per family: one pytest process dense, then one per method (see `vtprune_peer_plugin.py`). Writes to --out:
`<family>/<method>.jsonl` (one line per test), `<family>/<method>.log` (pytest's output), `results.json` and
`results.md`: per family and method the counts passed / failed / skipped / refused, and every test that passes
dense but fails under a method with the first line of its error. Tests that fail dense are left out of the
comparison and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import source

ROOT = Path(__file__).resolve().parents[2]  # the repository
PLUGIN_DIR = Path(__file__).resolve().parent
DENSE = "dense"


def methods_available(out: Path) -> list[str]:
    """Registered methods, asked of the repository's vtprune in a subprocess (this process may have another)."""
    code = "import vtprune; print(' '.join(vtprune.available()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_env(out), cwd="/")
    return out.stdout.split()


def _path_dir(out: Path) -> Path:
    """A folder holding only a link to this repository's `vtprune` (its root also holds a `tests` package, which
    would shadow transformers' `tests` in the pytest process)."""
    folder = out / "_pythonpath"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "vtprune"
    if not link.is_symlink():
        link.symlink_to(ROOT / "vtprune", target_is_directory=True)
    return folder


def _env(out: Path, method: str = DENSE, report: Path | None = None, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(_path_dir(out)), str(PLUGIN_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["VTPRUNE_PEER_METHOD"] = method
    if report is not None:
        env["VTPRUNE_PEER_REPORT"] = str(report)
    env.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail at once instead of waiting on the network
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("RUN_SLOW", None)  # slow tests load hub weights: they stay skipped
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_one(tree: Path, family: str, method: str, out: Path, select: str | None, timeout: float,
            threads: int | None) -> dict[str, Any]:
    """One pytest process: `family`'s test files with `method` (or dense). Returns timing and the exit status."""
    folder = out / family
    folder.mkdir(parents=True, exist_ok=True)
    report, log = folder / f"{method}.jsonl", folder / f"{method}.log"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-c", str(tree / "pytest.ini"), "--rootdir", str(tree),
           "-p", "vtprune_peer_plugin", "-p", "no:cacheprovider", "-q", "-rN",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", *source.FAMILIES[family]]
    if select:
        cmd += ["-k", select]
    start = time.monotonic()
    with open(log, "w") as fh:
        try:
            status = subprocess.run(cmd, cwd=tree, env=_env(out, method, report, threads), stdout=fh,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    seconds = round(time.monotonic() - start, 1)
    print(f"  {family:<16} {method:<11} {seconds:>7.1f} s  exit {status}", flush=True)
    return {"family": family, "method": method, "seconds": seconds, "exit": status}


def load(path: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["nodeid"]] = row
    return rows


def category(row: dict[str, Any]) -> str:
    """passed | failed | skipped | refused: a test whose every supported model refused the method ran dense."""
    if row["refused"] and not row["attached"]:
        return "refused"
    return row["outcome"] if row["outcome"] in ("passed", "failed", "skipped") else "failed"


# A test that stopped on one of vtprune's documented refusals of a call (README, "Generation modes"), named by its
# message: a 4-D mask over visual tokens, padding-free packed rows, torch.compile(fullgraph=True) stopping at a
# session hook. Any other error, vtprune's own included, is a regression.
REFUSAL_MARKERS = (
    "a prepared 4-D mask cannot follow its cuts",
    "position_ids restart within a row and no attention_mask was given",
    "vtprune: a session's hooks (data-dependent cuts) cannot be traced into one graph",
)


def refused_mid_test(row: dict[str, Any]) -> bool:
    text = f"{row.get('error', '')}\n{row.get('crash', '')}\n{row.get('tail', '')}"
    return any(marker in text for marker in REFUSAL_MARKERS)


def compare(dense: dict[str, dict], run: dict[str, dict]) -> dict[str, Any]:
    """Counts of one method's run and the tests that pass dense but not under the method: `regressions` (must be
    none) and `refused_calls` (the test stopped on a documented refusal of one call, listed apart)."""
    counts = {"tests": len(run), "passed": 0, "failed": 0, "skipped": 0, "refused": 0, "with_session": 0}
    for row in run.values():
        counts[category(row)] += 1
        counts["with_session"] += bool(row["attached"])
    regressions, refused_calls, refusals = [], [], {}
    for nodeid, row in sorted(run.items()):
        for message in row["refused"]:
            refusals[message] = refusals.get(message, 0) + 1
        base = dense.get(nodeid)
        if base is not None and base["outcome"] == "passed" and row["outcome"] != "passed" \
                and row["outcome"] != "skipped":
            (refused_calls if refused_mid_test(row) else regressions).append({
                "test": nodeid, "error": row.get("error", ""), "when": row.get("when", ""),
                "crash": row.get("crash", ""), "frames": row.get("frames", []),
                "vtprune_frames": row.get("vtprune_frames", []),
                "tail": row.get("tail", ""), "refused": bool(row["refused"]) and not row["attached"],
            })
    newly_skipped = [n for n, r in run.items() if r["outcome"] == "skipped" and dense.get(n, {}).get("outcome") == "passed"]
    missing = [n for n, r in dense.items() if r["outcome"] == "passed" and n not in run]
    return {"counts": counts, "regressions": regressions, "refused_calls": refused_calls, "refusals": refusals,
            "newly_skipped": newly_skipped, "missing": missing}


def summarise(out: Path, families: list[str], methods: list[str], timings: list[dict]) -> dict[str, Any]:
    result: dict[str, Any] = {"families": {}, "timings": timings}
    for family in families:
        dense = load(out / family / f"{DENSE}.jsonl")
        fam: dict[str, Any] = {
            "dense": {k: sum(category(r) == k for r in dense.values()) for k in ("passed", "failed", "skipped")},
            "dense_failures": [{"test": n, "error": r.get("error", "")} for n, r in sorted(dense.items())
                               if r["outcome"] == "failed"],
            "methods": {},
        }
        fam["dense"]["tests"] = len(dense)
        for method in methods:
            fam["methods"][method] = compare(dense, load(out / family / f"{method}.jsonl"))
        result["families"][family] = fam
    return result


def failure_groups(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Regressions grouped by their error (digits blanked) and the innermost vtprune frame (else the crash site)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for family, fam in result["families"].items():
        for method, m in fam["methods"].items():
            for r in m["regressions"]:
                where = _path((r["vtprune_frames"][-1] if r["vtprune_frames"] else r["crash"]).split(": in ")[0])
                key = (re.sub(r"\d+", "N", r["error"])[:200], where)
                g = groups.setdefault(key, {"error": key[0], "where": where, "count": 0, "runs": {}, "tests": {},
                                            "example": f"{family} / {method}: {r['test']}", "tail": r["tail"],
                                            "frames": [_path(f) for f in r.get("frames", [])]})
                g["count"] += 1
                run_key = f"{family}/{method}"
                g["runs"][run_key] = g["runs"].get(run_key, 0) + 1
                test = re.sub(r"_\d\d_.*$|_\d_\w+$", "", _short(r["test"]).split("::")[-1])
                g["tests"][test] = g["tests"].get(test, 0) + 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def _path(frame: str) -> str:
    """A traceback frame with its path cut to what follows site-packages/ or the repository/test-tree root."""
    return re.sub(r"^\S*?/(site-packages|_pythonpath|transformers-[^/]+)/", "", frame)


def _short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Peer suite: transformers' model tests, dense and with a keep-all session of each method", ""]
    lines += ["| family | method | tests | passed | failed | skipped | refused | with session | call refused | "
              "dense pass → fail |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, fam in result["families"].items():
        d = fam["dense"]
        lines.append(f"| {family} | dense | {d['tests']} | {d['passed']} | {d['failed']} | {d['skipped']} | – | – | – | – |")
        for method, m in fam["methods"].items():
            c = m["counts"]
            lines.append(f"| {family} | {method} | {c['tests']} | {c['passed']} | {c['failed']} | {c['skipped']} | "
                         f"{c['refused']} | {c['with_session']} | {len(m.get('refused_calls', []))} | "
                         f"{len(m['regressions'])} |")
    lines += ["", "## Tests that pass dense and fail under a method", ""]
    for family, fam in result["families"].items():
        for method, m in fam["methods"].items():
            for r in m["regressions"]:
                tag = " (refused, ran dense)" if r["refused"] else ""
                lines.append(f"- {family} / {method}{tag}: `{_short(r['test'])}` — {r['error']}")
            for n in m["newly_skipped"]:
                lines.append(f"- {family} / {method}: `{_short(n)}` — skipped under the method, passed dense")
            for n in m["missing"]:
                lines.append(f"- {family} / {method}: `{_short(n)}` — did not run (process ended early?)")
    lines += ["", "## Tests that pass dense and stop under a method on a documented refusal of one call", ""]
    for family, fam in result["families"].items():
        for method, m in fam["methods"].items():
            for r in m.get("refused_calls", []):
                lines.append(f"- {family} / {method}: `{_short(r['test'])}` — {r['error']}")
    lines += ["", "## Failures grouped by error and vtprune frame", ""]
    for i, g in enumerate(result.get("groups", []), 1):
        tests = ", ".join(f"{t} ({n})" for t, n in sorted(g["tests"].items(), key=lambda kv: -kv[1])[:10])
        lines += [f"### {i}. {g['count']} × {g['error']}", "", f"- at `{g['where']}`",
                  f"- runs: {', '.join(f'{k} ({n})' for k, n in g['runs'].items())}", f"- tests: {tests}",
                  f"- example: `{g['example']}`", "", "```", *g["frames"][-14:], "", *g["tail"].splitlines()[-6:],
                  "```", ""]
    lines += ["", "## Refusals (message: tests)", ""]
    for family, fam in result["families"].items():
        for method, m in fam["methods"].items():
            for message, count in sorted(m["refusals"].items()):
                lines.append(f"- {family} / {method}: {message} ({count})")
    lines += ["", "## Tests that fail dense here (left out of the comparison)", ""]
    for family, fam in result["families"].items():
        for f in fam["dense_failures"]:
            lines.append(f"- {family}: `{_short(f['test'])}` — {f['error']}")
    lines += ["", "## Timings", "", "| family | method | seconds | exit |", "| --- | --- | ---: | --- |"]
    for t in result["timings"]:
        lines.append(f"| {t['family']} | {t['method']} | {t['seconds']} | {t['exit']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(source.FAMILIES), choices=list(source.FAMILIES))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--out", type=Path, default=Path("out/peer"))
    parser.add_argument("--transformers-src", default=None, help="a transformers git checkout (see source.py)")
    parser.add_argument("--transformers-rev", default=None)
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression (a subset of the tests)")
    parser.add_argument("--jobs", type=int, default=1, help="pytest processes at once")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per pytest process")
    parser.add_argument("--skip-existing", action="store_true", help="reuse the .jsonl of runs that finished")
    parser.add_argument("--report-only", action="store_true", help="run nothing; tabulate the .jsonl files in --out")
    args = parser.parse_args(argv)

    try:
        tree = source.ensure(args.families, args.transformers_src, args.transformers_rev)
    except source.SourceMissing as err:
        print(f"peer suite: {err}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods or methods_available(out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    print(f"transformers tests from {tree}; families {args.families}; methods {methods}", flush=True)

    def needed(family: str, method: str) -> bool:
        done = out / family / f"{method}.log"
        return not (args.skip_existing and done.is_file() and "in " in done.read_text()[-300:])

    timings: list[dict] = []
    if args.report_only:
        previous = out / "results.json"
        timings = json.loads(previous.read_text())["timings"] if previous.is_file() else []
        args.skip_existing = True
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dense_runs = [pool.submit(run_one, tree, f, DENSE, out, args.select, args.timeout, threads)
                      for f in args.families if needed(f, DENSE) and not args.report_only]
        timings += [r.result() for r in dense_runs]
        runs = [pool.submit(run_one, tree, f, m, out, args.select, args.timeout, threads)
                for f in args.families for m in methods if needed(f, m) and not args.report_only]
        timings += [r.result() for r in runs]
    result = summarise(out, args.families, methods, timings)
    result["groups"] = failure_groups(result)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    print(f"wrote {out / 'results.md'}")
    regressions = sum(len(m["regressions"]) for fam in result["families"].values() for m in fam["methods"].values())
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
