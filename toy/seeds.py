"""Several seeds of the toy run (`train_toy.py --seeds 0 1 2`): each seed is the whole pipeline
(evaluator, teacher, students, scores: everything varies with the seed) in OUT/seed-S, an ordinary
run of its own that resumes like one. The seeds run in one process per worker (toy/workers.py: one
per visible GPU, so two GPUs run two seeds at once; one GPU, or the CPU, runs them in turn), and
OUT/report.md puts them together: every row as a mean with its 95% interval over the seeds, and the
paper's comparisons as paired differences (same seed: same teacher, prompts and noise)."""

import json
import os

from tinyteef.checkpoint import atomic_write

from . import workers
from .methods import STUDENTS, TEACHER_SAMPLERS
from .stats import fmt, interval, paired

TABLE = "table.json"  # what a seed's run leaves for the merge: its main table, one row per method
METRICS = ("accuracy", "fd", "rms", "ms")  # the numbers of a row that the merge averages


def save_table(out, table):
    """A seed's main table (OUT/seed-S/table.json): each row's numbers and effective guidance."""
    keys = (*METRICS, "passes", "nominal", "guidance", "matches")
    rows = {name: {k: r[k] for k in keys if k in r} for name, r in table.items()}
    atomic_write(os.path.join(out, TABLE), lambda f: f.write(json.dumps(rows, indent=1).encode()))


def comparisons(rows):
    """The paper's comparisons among a table's rows, as (what, row a, row b): TeEFusion against
    DistillCFG and against the G(psi(w)) ablation (Table 3), Alg. 1's t ~ U[0, 1] against SD3's
    logit-normal, each student against the teacher sampler it imitates, each reflection sampler
    against Euler+CFG at the same w (Table 4) and, where they differ, at its effective guidance
    (a row's "matches")."""
    out = [("TeEFusion vs DistillCFG (Table 3)", "TeEFusion from W2SD+CFG", "DistillCFG from W2SD+CFG"),
           ("TeEFusion vs G(psi(w)) ablation (Table 3)", "TeEFusion from W2SD+CFG", "G(psi(w)) from W2SD+CFG"),
           ("t ~ U[0, 1] vs logit-normal (Alg. 1 line 4)", "TeEFusion from W2SD+CFG",
            "TeEFusion from W2SD+CFG, t logit-normal")]
    out += [(f"{n} vs its teacher", n, spec.imitates) for n, spec in STUDENTS.items()]
    out += [(f"{t} vs Euler+CFG (Table 4)", t, "Teacher Euler+CFG")
            for t in TEACHER_SAMPLERS if t != "Teacher Euler+CFG"]
    out += [(f"{r['matches']} vs {name} (matched guidance)", r["matches"], name)
            for name, r in rows.items() if "matches" in r]
    return [c for c in out if c[1] in rows and c[2] in rows]


def verdict(sign, lower_is_better):
    """A paired difference's sign as words: which row is better, or "not separated"."""
    if sign == 0:
        return "not separated"
    return "first better" if (sign < 0) == lower_is_better else "second better"


def merge_report(out, seeds, title):
    """OUT/report.md over the seeds' tables. Returns the path."""
    tables = []
    for s in seeds:
        path = os.path.join(out, f"seed-{s}", TABLE)
        with open(path) as f:
            tables.append(json.load(f))
    names = list(tables[0])
    lines = [f"# {title}, seeds {', '.join(map(str, seeds))}", "",
             f"Each seed is the whole pipeline (evaluator, teacher, students: all vary with it), in seed-S/ "
             f"with its own report. Values: mean ± the half-width of a 95% interval over the {len(seeds)} seeds "
             "(Student's t); a single seed gives the value alone.", "",
             "## Every row", "",
             "| method | effective guidance | passes / step | prompt accuracy | Fréchet distance | "
             "RMS to its teacher's sample | ms / image |", "|---" * 7 + "|"]
    for n in names:
        cells = []
        for k, scale in (("accuracy", 100), ("fd", 1), ("rms", 1), ("ms", 1)):
            values = [t[n][k] * scale for t in tables if k in t[n]]
            cells.append(fmt(*interval(values), ".1f" if k == "accuracy" else ".3f") if values else "—")
        lines.append(f"| {n} | {tables[0][n].get('guidance', '—')} | {tables[0][n]['passes']:.3g} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## The paper's comparisons, paired by seed", "",
              "The difference first − second over the same seeds, with its 95% interval. A difference is held "
              "only where the interval excludes 0; otherwise the rows are not separated by these seeds.", "",
              "| comparison | Fréchet distance difference | verdict | accuracy difference (points) | verdict |",
              "|---|---|---|---|---|"]
    for what, a, b in comparisons(tables[0]):
        fd = paired([t[a]["fd"] for t in tables], [t[b]["fd"] for t in tables])
        acc = paired([100 * t[a]["accuracy"] for t in tables], [100 * t[b]["accuracy"] for t in tables])
        lines.append(f"| {what} | {fmt(fd[0], fd[1])} | {verdict(fd[2], True)} | {fmt(acc[0], acc[1], '.1f')} | "
                     f"{verdict(acc[2], False)} |")
    lines += ["", "Per seed: " + ", ".join(f"[seed {s}](seed-{s}/report.md)" for s in seeds), ""]
    path = os.path.join(out, "report.md")
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


def run(script, args, mode, out):
    """train_toy.py --seeds: each seed's whole run as its own process of `script` (the seeds not
    finished yet; a finished seed leaves its table.json), then one report over all of them.
    `args`: train_toy.py's flags; `mode`: its compile mode."""
    if os.path.exists(os.path.join(out, "config.json")):
        raise SystemExit(f"error: {out} holds a single-seed run; give --seeds another --out")
    n = workers.count(args)
    todo = [s for s in args.seeds if not os.path.exists(os.path.join(out, f"seed-{s}", TABLE))]
    commands = [workers.command(script, [*workers.flags(args, mode), "--seed", str(s), "--out",
                                         os.path.join(out, f"seed-{s}")]) for s in todo]
    try:
        workers.run_all(commands, workers.slots("cuda" if args.device.startswith("cuda") else "cpu", n))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}")
    path = merge_report(out, args.seeds, f"Toy run: {args.data}, preset {args.preset}")
    print(f"done: {len(args.seeds)} seeds; report over them in {os.path.abspath(path)}")
