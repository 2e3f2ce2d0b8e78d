#!/usr/bin/env python3
"""Page benchmark: a generated Wagtail site (tests/wagtail, made through Wagtail's own
API) mirrored by a wagtail channel between release builds of mirror-source and
mirror-target on loopback. Standard library only; the CMS's Python environment comes
from scripts/wagtail-env.sh.

Each round starts a fresh target (empty page store) and runs: the full mirror, the
no-change re-run, and the re-run after `cms.py edit --percent 1` (a new title published
for 1% of the articles). It reports wall times, pages per second (pages over the full
mirror's wall; for the re-runs, pages checked per second) and the peak resident memory
(VmHWM) of both services over the round, as medians with the range over rounds.

    python3 bench/pages.py [--sections 10 --topics 10 --articles 100] [--rounds 3]
                           [--cms DIR]   # reuse a generated CMS (made once per shape)
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BENCH_BIN", ROOT / "target" / "release"))
CMS_PY = ROOT / "tests" / "wagtail" / "cms.py"


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


def python():
    out = subprocess.run([ROOT / "scripts" / "wagtail-env.sh"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def cms_env(cms):
    return dict(os.environ, CMS_DB=f"sqlite:///{cms}/cms.sqlite3", CMS_MEDIA_ROOT=f"{cms}/media")


def generate(py, cms, a):
    """The CMS of this shape, generated once and kept (with a copy to restore after
    each round's edit)."""
    shape = f"{a.sections}x{a.topics}x{a.articles}"
    made = cms / f"made-{shape}.json"
    if made.exists():
        return json.loads(made.read_text())
    cms.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    out = subprocess.run(
        [py, CMS_PY, "generate", "--sections", str(a.sections), "--topics", str(a.topics),
         "--articles", str(a.articles), "--images", "20", "--docs", "10"],
        check=True, capture_output=True, text=True, env=cms_env(cms))
    print(f"generated {shape} in {time.monotonic() - t:.0f} s", file=sys.stderr)
    (cms / "pristine.sqlite3").write_bytes((cms / "cms.sqlite3").read_bytes())
    made.write_text(out.stdout)
    return json.loads(out.stdout)


def start(args, log):
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=log, text=True)
    p.stdout.readline()  # "... listening on ADDR": it is serving
    return p


def job(source_url, env=None):
    t = time.monotonic()
    out = subprocess.run([BIN / "mirrorctl", "--source", source_url, "start", "cms", "--wait", "--json"],
                         capture_output=True, text=True)
    wall = time.monotonic() - t
    if out.returncode > 1:
        raise SystemExit(f"job failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    j = json.loads(out.stdout[out.stdout.index("{\n"):])
    return wall, j


def one_round(py, cms, work, pages):
    (cms / "cms.sqlite3").write_bytes((cms / "pristine.sqlite3").read_bytes())
    tport, sport = free_port(), free_port()
    (work / "mirror.toml").write_text(
        f'[[channel]]\nname = "cms"\nsource = "wagtail+sqlite://{cms}/cms.sqlite3"\n'
        f'media_root = "{cms}/media"\nroot_page = "/home/news/"\ndelete = true\n\n'
        f'  [[channel.target]]\n  url = "http://127.0.0.1:{tport}"\n  site = "main"\n')
    log = open(work / "services.log", "a")
    target = start([BIN / "mirror-target", "--listen", f"127.0.0.1:{tport}", "--site", f"main={work}/site",
                    "--data-dir", work / "target-data"], log)
    source = start([BIN / "mirror-source", "--listen", f"127.0.0.1:{sport}", "--config", work / "mirror.toml",
                    "--data-dir", work / "source-data"], log)
    url = f"http://127.0.0.1:{sport}"
    try:
        full, j = job(url)
        sent = j["targets"][0]["items_done"]
        same, j2 = job(url)
        assert j2["targets"][0]["items_total"] == 0, j2
        edited = int(subprocess.run([py, CMS_PY, "edit", "--percent", "1"], check=True,
                                    capture_output=True, text=True, env=cms_env(cms)).stdout)
        edit, j3 = job(url)
        changed = j3["targets"][0]["items_total"]
        assert changed >= edited, f"{edited} pages published, {changed} sent: {j3}"
        return {
            "full": full, "nochange": same, "edit": edit, "items": sent, "edited": edited,
            "edit_items": changed,
            "source_mib": hwm_kib(source.pid) / 1024, "target_mib": hwm_kib(target.pid) / 1024,
        }
    finally:
        for p in (source, target):
            p.terminate(); p.wait()


def spread(xs, fmt="{:.2f}"):
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", type=int, default=10)
    ap.add_argument("--topics", type=int, default=10)
    ap.add_argument("--articles", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cms", type=Path, default=ROOT / "target" / "bench-cms")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--workspace", "--bins"], cwd=ROOT, check=True)
    py = python()
    made = generate(py, a.cms.resolve(), a)
    pages = made["live_in_news"]
    rounds = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="cms-mirror-pages-") as work:
            r = one_round(py, a.cms.resolve(), Path(work), pages)
            rounds.append(r)
            print(f"round {i + 1}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}",
                  file=sys.stderr)
    col = lambda k: [r[k] for r in rounds]
    print(f"pages in the subtree (both locales): {pages}; items of the full mirror (pages + media): {rounds[0]['items']}")
    print(f"full mirror:    {spread(col('full'))} s, {spread([pages / r['full'] for r in rounds], '{:.0f}')} pages/s")
    print(f"no change:      {spread(col('nochange'))} s, {spread([pages / r['nochange'] for r in rounds], '{:.0f}')} pages checked/s")
    print(f"1% edited:      {spread(col('edit'))} s ({rounds[0]['edited']} pages published, {rounds[0]['edit_items']} sent)")
    print(f"peak RSS:       source {spread(col('source_mib'), '{:.0f}')} MiB, target {spread(col('target_mib'), '{:.0f}')} MiB")


if __name__ == "__main__":
    main()
