#!/usr/bin/env python3
"""Benchmark driver (see bench/run.sh). Standard library only.

Each round runs cms-mirror, rsync client -> rsync daemon on loopback and plain local
rsync (in this order in even rounds, in the reverse order in odd ones), each through
the full mirror, the no-change re-run and the re-run after the edit. files/s and MB/s
are the tree's files and bytes over the wall time (for re-runs: files checked per
second). Each timed run writes to a fresh destination directory (never deleted inside
a batch: on these machines creating files right after deleting a similar tree is 5-10x
slower), source trees are read just before each timed run (warm cache), and the tools
alternate (A B C, C B A) so all see the same machine state. "ratio" is the median
cms-mirror wall over the median rsync->daemon wall; "ratio per round" is the range of
the same ratio within each round. Every destination is checked afterwards
with `rsync -anc --delete src/ dst/`, which must list nothing.

BENCH_BASE=DIR runs the binaries in DIR too, in the same rounds (alternating with the
others), and adds each phase's median wall of that build and the ratio of this build's
wall to it: how to show that a change did not make cms-mirror slower.

BENCH_CHANNEL_TOML adds lines to each channel of cms-mirror's config, to compare
settings (e.g. BENCH_CHANNEL_TOML=$'window = 16\n').

--atomic compares publish = "atomic" with publish = "in_place" (the same build, the
same rounds, alternating): wall times, and the disk the target uses after the edit
(the blocks of its site's files, each inode once, plus its ledger database): what
keeping generations costs. With --memory N: the memory run publishes atomically.
"""
import argparse, json, os, re, shlex, shutil, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_BIN: a directory of other builds of the three binaries (to compare builds).
BIN = Path(os.environ.get("BENCH_BIN", ROOT / "target" / "release"))
BASE = Path(os.environ["BENCH_BASE"]) if os.environ.get("BENCH_BASE") else None
GEN = (ROOT / ".." / "shared" / "bench" / "gen_dataset.py").resolve()


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def warm(path):
    """Reads the tree into the page cache and writes back what earlier runs left dirty:
    no timed run pays for another's writeback (cms-mirror's syncfs would otherwise
    flush the previous rsync's output)."""
    # Through a pipe: GNU tar skips reading file contents when its archive is /dev/null.
    tar = f"tar cf - -C {shlex.quote(str(path.parent))} {shlex.quote(path.name)} | cat > /dev/null"
    subprocess.run(["bash", "-o", "pipefail", "-c", tar], check=True)
    subprocess.run(["sync"], check=True)


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def hwm_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def start(cmd, log):
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    for line in p.stdout:
        if "listening on" in line:
            return p, line.split("listening on")[1].strip()
    raise SystemExit(f"{cmd[0]} did not start; see {log}")


def datasets(base, names):
    base.mkdir(parents=True, exist_ok=True)
    for k in names:
        if not (base / "base" / k).exists():
            sh(sys.executable, GEN, "gen", k, "--out", base / "base", "--seed", "42")
        if not (base / "mut" / k).exists():
            (base / "mut").mkdir(exist_ok=True)
            sh("cp", "-a", base / "base" / k, base / "mut" / k)
            sh(sys.executable, GEN, "mutate", base / "mut" / k, "--seed", "1")


def verify(src, dst):
    # The target's trace file is its own note, not content.
    out = subprocess.run(["rsync", "-anci", "--delete", "--exclude=/.cms-mirror-trace", f"{src}/", f"{dst}/"],
                         capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if l.strip() and not l.startswith(".d")]
    if lines:
        raise SystemExit(f"{dst} differs from {src}: {lines[:5]}")


def disk_used(paths):
    """Bytes of the blocks under `paths`, each inode counted once (hard links share)."""
    seen, total = set(), 0
    for top in paths:
        for dirpath, dirs, names in os.walk(top):
            for n in dirs + names:
                st = os.lstat(os.path.join(dirpath, n))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def cms_round(work, src_base, src_mut, durability, bin_dir=BIN, publish="in_place"):
    dst = work / f"cms-{time.time_ns()}"
    tdir, sdir = work / f"t-{time.time_ns()}", work / f"s-{time.time_ns()}"
    tdir.mkdir(); sdir.mkdir()
    target, taddr = start([bin_dir / "mirror-target", "--listen", "127.0.0.1:0", "--site", f"main={dst}",
                           "--data-dir", tdir, "--durability", durability], tdir / "log")
    cfg = sdir / "mirror.toml"
    cfg.write_text("".join(
        f'[[channel]]\nname = "{n}"\nsource = "{p}"\ndelete = true\npublish = "{publish}"\n{os.environ.get("BENCH_CHANNEL_TOML", "")}[[channel.target]]\nurl = "http://{taddr}"\nsite = "main"\n'
        for n, p in (("base", src_base), ("mut", src_mut))))
    source, saddr = start([bin_dir / "mirror-source", "--listen", "127.0.0.1:0", "--config", cfg, "--data-dir", sdir], sdir / "log")
    res = {}
    try:
        for phase, ch, tree in (("full", "base", src_base), ("nochange", "base", src_base), ("edit", "mut", src_mut)):
            warm(tree)
            t0 = time.perf_counter()
            out = subprocess.run([bin_dir / "mirrorctl", "--source", f"http://{saddr}", "start", ch, "--wait", "--json"],
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(f"cms-mirror {phase} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            job = json.loads(out.stdout[out.stdout.index("{\n"):])
            t = job["targets"][0]
            res[phase] = {"wall": wall, "wire": t["bytes_on_wire"], "files": t["items_total"]}
            verify(tree, dst)
        res["rss"] = (hwm_kib(source.pid) // 1024, hwm_kib(target.pid) // 1024)
        site = [dst.with_name(dst.name + ".generations")] if publish == "atomic" else [dst]
        res["disk"] = disk_used(site) + sum(f.stat().st_size for f in tdir.glob("target.db*"))
    finally:
        for p in (source, target):
            p.terminate(); p.wait()
    return res


def rsync_local_round(work, src_base, src_mut):
    """rsync without a daemon: one local process pair, the floor for a local copy."""
    dst = work / f"rsync-local-{time.time_ns()}"
    res = {}
    for phase, tree in (("full", src_base), ("nochange", src_base), ("edit", src_mut)):
        warm(tree)
        t0 = time.perf_counter()
        subprocess.run(["rsync", "-a", "--delete", f"{tree}/", f"{dst}/"], check=True)
        res[phase] = {"wall": time.perf_counter() - t0}
        verify(tree, dst)
    return res


def tree_size(path):
    files = total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            total += st.st_size
    return files, total


def rsync_round(work, src_base, src_mut):
    root = work / f"rsyncd-{time.time_ns()}"
    root.mkdir()
    port = free_port()
    conf = root / "rsyncd.conf"
    conf.write_text(f"use chroot = false\nuid = root\ngid = root\n[bench]\npath = {root}\nread only = false\n")
    d = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={port}", f"--config={conf}"])
    time.sleep(0.3)
    res = {}
    try:
        for phase, tree in (("full", src_base), ("nochange", src_base), ("edit", src_mut)):
            warm(tree)
            t0 = time.perf_counter()
            out = subprocess.run(["/usr/bin/time", "-f", "RSS %M", "rsync", "-a", "--delete", "--stats",
                                  f"{tree}/", f"rsync://127.0.0.1:{port}/bench/dst/"], capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            sent = int(re.search(r"Total bytes sent: ([\d,]+)", out.stdout).group(1).replace(",", ""))
            rss = int(re.search(r"RSS (\d+)", out.stderr).group(1)) // 1024
            res[phase] = {"wall": wall, "wire": sent, "rss": rss}
            verify(tree, root / "dst")
    finally:
        d.terminate(); d.wait()
    return res


def memory_run(work, n, publish="in_place"):
    tree = work / f"tiny-{n}"
    if not tree.exists():
        print(f"creating {n} tiny files in {tree} ...", flush=True)
        for i in range(n):
            d = tree / f"d{i % 1000:03d}" / f"e{(i // 1000) % 100:02d}"
            if i < 100_000 or not d.exists():
                d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(b"x" * (i % 3))
    r = cms_round(work, tree, tree, "syncfs", publish=publish)
    print(f"| {n:,} tiny files ({publish}) | full {r['full']['wall']:.1f} s | no-change {r['nochange']['wall']:.2f} s | peak RSS source {r['rss'][0]} MiB, target {r['rss'][1]} MiB |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datasets", default="small,large,mixed")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/cms-mirror-bench"))
    ap.add_argument("--durability", default="syncfs")
    ap.add_argument("--memory", type=int, default=0, help="only the memory run on N tiny files")
    ap.add_argument("--atomic", action="store_true", help='publish = "atomic" against "in_place"')
    a = ap.parse_args()
    base = Path(a.dir)
    work = base / "runs"
    work.mkdir(parents=True, exist_ok=True)
    if a.memory:
        memory_run(work, a.memory, "atomic" if a.atomic else "in_place")
        return
    names = a.datasets.split(",")
    datasets(base, names)
    if a.atomic:
        print("| dataset | phase | in place wall | atomic wall | atomic / in place | per round | disk in place | disk atomic | extra disk |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        try:
            for k in names:
                atomic_table(work, base, k, a)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    rounds = []
    base_cols = ("| base wall | vs base | vs base per round ", "---:|---:|---:|") if BASE else ("", "")
    print("| dataset | phase | cms-mirror wall | rsync->daemon wall | ratio | ratio per round | rsync local wall | cms files/s | cms MB/s "
          f"| cms wire bytes | rsync wire bytes | cms RSS src/tgt MiB | rsync RSS MiB {base_cols[0]}|")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + base_cols[1])
    try:
        for k in names:
            rounds.extend(table(work, base, k, a))
        # Each round's walls under the medians: how far single runs spread on this
        # machine (page-cache and writeback state swing rsync's figures most).
        print("\n| dataset | phase | cms-mirror wall per round | rsync->daemon wall per round |")
        print("|---|---|---|---|")
        for row in rounds:
            print(row)
    finally:
        # Every round keeps three copies of its dataset (about 20 GB for all three
        # datasets and 3 rounds); they go at the end, not between runs: ext4 without a
        # journal (as here) skips inodes freed in the last 1-6 minutes when it creates
        # files, which would slow whatever is measured next.
        shutil.rmtree(work, ignore_errors=True)


def atomic_table(work, base, k, a):
    """One dataset, in place against atomic, in alternating rounds."""
    runs = work / k
    runs.mkdir(parents=True, exist_ok=True)
    src_base, src_mut = base / "base" / k, base / "mut" / k
    res = {"in_place": [], "atomic": []}
    for r in range(a.rounds):
        for publish in ("in_place", "atomic") if r % 2 == 0 else ("atomic", "in_place"):
            res[publish].append(cms_round(runs, src_base, src_mut, a.durability, publish=publish))
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    for phase in ("full", "nochange", "edit"):
        ip = statistics.median(r[phase]["wall"] for r in res["in_place"])
        at = statistics.median(r[phase]["wall"] for r in res["atomic"])
        paired = sorted(x[phase]["wall"] / y[phase]["wall"] for x, y in zip(res["atomic"], res["in_place"]))
        disk = ""
        if phase == "edit":
            di = statistics.median(r["disk"] for r in res["in_place"])
            da = statistics.median(r["disk"] for r in res["atomic"])
            disk = f" {mib(di)} | {mib(da)} | {mib(da - di)} ({(da - di) / di:.1%}) |"
        else:
            disk = " | | |"
        print(f"| {k} | {phase} | {ip:.3f} s | {at:.3f} s | {at / ip:.2f}x | {paired[0]:.2f}-{paired[-1]:.2f}x |{disk}", flush=True)


def vs_base(cms, base_runs, phase):
    """The base build's median wall and this build's over it (median, range per round)."""
    if not base_runs:
        return ""
    bw = statistics.median(r[phase]["wall"] for r in base_runs)
    cw = statistics.median(r[phase]["wall"] for r in cms)
    paired = sorted(c[phase]["wall"] / b[phase]["wall"] for c, b in zip(cms, base_runs))
    return f" {bw:.3f} s | {cw / bw:.2f}x | {paired[0]:.2f}-{paired[-1]:.2f}x |"


def table(work, base, k, a):
    """Measures one dataset (all rounds) and prints its rows; returns the rows of each
    round's walls, for a second table."""
    runs = work / k
    runs.mkdir(parents=True, exist_ok=True)
    cms, rs, local, base_runs = [], [], [], []
    src_base, src_mut = base / "base" / k, base / "mut" / k
    tools = [
        lambda: cms.append(cms_round(runs, src_base, src_mut, a.durability)),
        lambda: rs.append(rsync_round(runs, src_base, src_mut)),
        lambda: local.append(rsync_local_round(runs, src_base, src_mut)),
    ]
    if BASE:
        tools.insert(1, lambda: base_runs.append(cms_round(runs, src_base, src_mut, a.durability, BASE)))
    for r in range(a.rounds):
        # A B C, then C B A: a tool that runs later in a round (on a fuller file system,
        # after more writeback) is not always the same one.
        for run_tool in tools if r % 2 == 0 else tools[::-1]:
            run_tool()
    for phase in ("full", "nochange", "edit"):
        files, size = tree_size(base / ("mut" if phase == "edit" else "base") / k)
        cw = statistics.median(r[phase]["wall"] for r in cms)
        rw = statistics.median(r[phase]["wall"] for r in rs)
        lw = statistics.median(r[phase]["wall"] for r in local)
        paired = sorted(c[phase]["wall"] / r[phase]["wall"] for c, r in zip(cms, rs))
        print(f"| {k} | {phase} | {cw:.3f} s | {rw:.3f} s | {cw / rw:.2f}x | {paired[0]:.2f}-{paired[-1]:.2f}x | {lw:.3f} s | {files / cw:,.0f} | {size / cw / 1e6:,.0f} "
              f"| {int(statistics.median(r[phase]['wire'] for r in cms)):,} "
              f"| {int(statistics.median(r[phase]['wire'] for r in rs)):,} | {max(r['rss'][0] for r in cms)}/{max(r['rss'][1] for r in cms)} "
              f"| {max(r[phase]['rss'] for r in rs)} |{vs_base(cms, base_runs, phase)}", flush=True)
    walls = lambda results, phase: " / ".join(f"{r[phase]['wall']:.3f}" for r in results)
    return [f"| {k} | {phase} | {walls(cms, phase)} s | {walls(rs, phase)} s |" for phase in ("full", "nochange", "edit")]


if __name__ == "__main__":
    main()
