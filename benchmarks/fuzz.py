"""The differential fuzz of mos/testing/fuzz_cases.py at scale: a million calls or more.

Case i is drawn from a PRNG seeded with i, so any case can be replayed alone (`--replay I`).
Cases run in forked worker processes, a chunk at a time; a worker killed by a signal is a crash,
charged to the case it was running (each worker publishes its current case index), and the rest
of its chunk is run again in a fresh worker. Reports crashes, wrong results and unclear errors
(the targets are 0, 0, 0) into the `fuzz` section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np

import mos
import mos.testing.fuzz_cases as fc

KINDS = ("ok", "wrong", "unclear")
EXAMPLES_KEPT = 5  # failure descriptions kept per (kind, entry point)


def run_chunk(start, stop, progress, results):
    """Worker: runs cases [start, stop), publishing the index of the case it is about to run."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mos.set_num_threads(1)
    counts = collections.Counter()
    examples = []
    kept = collections.Counter()
    for i in range(start, stop):
        progress.value = i
        outcome = fc.run_case(fc.draw_case(fc.RandomDraw(i)))
        valid = "invalid" if outcome.case.defect else "valid"
        counts[(outcome.case.entry, valid, outcome.kind)] += 1
        if outcome.kind != "ok" and kept[(outcome.kind, outcome.case.entry)] < EXAMPLES_KEPT:
            kept[(outcome.kind, outcome.case.entry)] += 1
            examples.append((i, outcome.kind, fc.describe(outcome)[:600]))
    results.send((start, stop, dict(counts), examples))
    results.close()


class Fuzz:
    """Runs [0, n) in chunks over `workers` forked processes, restarting after crashes."""

    def __init__(self, n, workers, chunk):
        self.context = mp.get_context("fork")
        self.pending = collections.deque((s, min(s + chunk, n)) for s in range(0, n, chunk))
        self.workers = workers
        self.counts = collections.Counter()
        self.examples = []
        self.crashes = []  # case indices that killed their worker

    def _start(self, start, stop):
        progress = self.context.Value("q", start, lock=False)
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=run_chunk, args=(start, stop, progress, send), daemon=True)
        process.start()
        send.close()
        return dict(process=process, progress=progress, receive=receive, start=start, stop=stop)

    def run(self, report_every=30.0):
        running, last_report, t0 = [], time.monotonic(), time.monotonic()
        done_cases = 0
        while self.pending or running:
            while self.pending and len(running) < self.workers:
                running.append(self._start(*self.pending.popleft()))
            mp.connection.wait([w["receive"] for w in running] + [w["process"].sentinel for w in running],
                               timeout=1.0)
            for w in list(running):
                report = _receive(w["receive"])
                if report is not None:
                    start, stop, counts, examples = report
                    self.counts.update(counts)
                    self.examples += examples
                    done_cases += stop - start
                    w["process"].join()
                    running.remove(w)
                elif not w["process"].is_alive():
                    w["process"].join()
                    crashed = int(w["progress"].value)
                    self.crashes.append((crashed, w["process"].exitcode))
                    print(f"crash: case {crashed} ended its worker with exit code {w['process'].exitcode}",
                          flush=True)
                    # The cases before it are re-run (deterministic) so the counts stay exact.
                    if w["start"] < crashed:
                        self.pending.appendleft((w["start"], crashed))
                    if crashed + 1 < w["stop"]:
                        self.pending.appendleft((crashed + 1, w["stop"]))
                    done_cases += 1
                    running.remove(w)
            if time.monotonic() - last_report > report_every:
                last_report = time.monotonic()
                rate = done_cases / (last_report - t0)
                print(f"{done_cases} cases in {last_report - t0:.0f} s ({rate:.0f}/s)", flush=True)
        return time.monotonic() - t0


def _receive(connection):
    """A worker's report, or None while it runs or when it died before sending one."""
    try:
        return connection.recv() if connection.poll() else None
    except EOFError:
        return None


def summary(fuzz, n, seconds, workers):
    by_kind = collections.Counter()
    by_entry = collections.defaultdict(collections.Counter)
    for (entry, valid, kind), count in fuzz.counts.items():
        by_kind[kind] += count
        by_kind[valid] += count
        by_entry[entry][valid] += count
        by_entry[entry][kind] += count
    calls = sum(by_kind[k] for k in KINDS) + len(fuzz.crashes)
    return calls, by_kind, by_entry


def section(fuzz, n, seconds, workers, command):
    calls, by_kind, by_entry = summary(fuzz, n, seconds, workers)
    lines = [
        "## Differential fuzz of every entry point",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {fc_machine()}; {workers} worker processes on a machine shared with other jobs.",
        "",
        "Each case makes one call to one of the "
        f"{len(fc.ENTRY_POINTS)} entry points of `mos.functional` and `mos._C` "
        "(`mos/testing/fuzz_cases.py`, the generator `tests/test_fuzz.py` also drives through hypothesis). "
        "A valid call must match a float64 NumPy reference (a quarter of them hand every array over "
        "as a torch tensor, through DLPack); a call with one defect (wrong type, "
        "dimension, dtype, shape, stride, read-only output, out-of-range or repeated index, "
        "non-finite or overflowing scale, zero columns, overlap, missing or unknown argument, or a "
        "hostile DLPack producer) must raise TypeError, ValueError or BufferError naming the "
        "argument, and leave every array unchanged. Crashes are caught by running the cases in "
        "forked workers.",
        "",
        f"**{calls:,} calls in {seconds / 60:.1f} min** ({calls / seconds:,.0f} calls/s): "
        f"{by_kind['valid']:,} valid, {by_kind['invalid']:,} with a defect.",
        "",
        "| crashes | wrong results | unclear errors |",
        "|---:|---:|---:|",
        f"| {len(fuzz.crashes)} | {by_kind['wrong']} | {by_kind['unclear']} |",
        "",
        "| entry point | valid calls | calls with a defect | wrong | unclear |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in fc.ENTRY_POINTS:
        c = by_entry[entry]
        lines.append(f"| `{entry}` | {c['valid']:,} | {c['invalid']:,} | {c['wrong']} | {c['unclear']} |")
    if fuzz.crashes or fuzz.examples:
        lines += ["", "First failures (replay one with `--replay CASE`):", ""]
        lines += [f"- case {i}: crash, exit code {code}" for i, code in fuzz.crashes[:20]]
        lines += [f"- case {i}: {kind}: `{text}`" for i, kind, text in fuzz.examples[:20]]
    return "\n".join(lines)


def fc_machine():
    from results_md import cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
            f"NumPy {np.__version__}; `mos.build_info()` = `{mos.build_info()}`")


def replay(index):
    outcome = fc.run_case(fc.draw_case(fc.RandomDraw(index)))
    print(fc.describe(outcome) if outcome.kind != "ok" else f"case {index}: ok ({outcome.case.entry}, "
          f"{outcome.case.defect or 'valid'})")
    return 0 if outcome.kind == "ok" else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="number of calls (default 1,000,000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=5000, help="cases per worker process")
    parser.add_argument("--replay", type=int, help="run case REPLAY alone and describe it")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    fuzz = Fuzz(args.cases, args.workers, args.chunk)
    seconds = fuzz.run()
    command = "python benchmarks/fuzz.py" + ("" if args.cases == 1_000_000 else f" --cases {args.cases}") + (
        "" if args.workers == (os.cpu_count() or 1) else f" --workers {args.workers}")
    text = section(fuzz, args.cases, seconds, args.workers, command)
    print(text)
    if not args.no_write:
        from results_md import write_section

        print("wrote", write_section("fuzz", text))
    calls, by_kind, _ = summary(fuzz, args.cases, seconds, args.workers)
    return 0 if not fuzz.crashes and not by_kind["wrong"] and not by_kind["unclear"] else 1


if __name__ == "__main__":
    sys.exit(main())
