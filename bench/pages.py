#!/usr/bin/env python3
"""Page benchmark: a generated Wagtail site (tests/wagtail `cms.py bulk`, made through
Wagtail's own API) mirrored by a wagtail channel between release builds of mirror-source
and mirror-target on loopback, with the peer, wagtail-transfer, importing the same
subtrees into an empty Wagtail beside it. Standard library only; the CMS's Python
environment comes from scripts/wagtail-env.sh.

BENCH_BIN=DIR runs the binaries in DIR (built before, e.g. to compare two builds) instead
of building the workspace's.

Each round starts a fresh target (empty page store) and runs: the full mirror, the
no-change re-run, and the re-run after `cms.py edit --percent 1` (a new title published
for 1% of the articles). It reports wall times, pages per second (pages over the full
mirror's wall; for the re-runs, pages checked per second) and the peak resident memory
(VmHWM) of both services over the round, as medians with the range over rounds.

The peer runs once: the source Wagtail served by Django's runserver with
wagtail-transfer's export views, and `cms.py transfer-import` running wagtail-transfer's
own import (as its admin view does) of the English and German subtrees into a fresh
Wagtail, twice (the first import creates every page, the second updates every page: it
has no notion of what changed).

    python3 bench/pages.py [--sections 10 --topics 10 --articles 66] [--rounds 3]
                           [--cms DIR]   # where generated CMSs are kept (one per shape)
                           [--no-peer]
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BENCH_BIN", ROOT / "target" / "release"))
CMS_PY = ROOT / "tests" / "wagtail" / "cms.py"
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, hwm_kib  # noqa: E402  (the file benchmark's helpers)


def python():
    out = subprocess.run([ROOT / "scripts" / "wagtail-env.sh"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def cms_env(cms):
    return dict(os.environ, CMS_DB=f"sqlite:///{cms}/cms.sqlite3", CMS_MEDIA_ROOT=f"{cms}/media")


def generate(py, cms, a):
    """The CMS of this shape, generated once and kept (with a copy to restore after
    each round's edit)."""
    shape = f"{a.sections}x{a.topics}x{a.articles}"
    made = cms / "made.json"
    if made.exists():
        return json.loads(made.read_text())
    cms.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    out = subprocess.run(
        [py, CMS_PY, "bulk", "--sections", str(a.sections), "--topics", str(a.topics),
         "--articles", str(a.articles)],
        check=True, stdout=subprocess.PIPE, text=True, env=cms_env(cms))
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


def scaled(cms, made, copies):
    """The generated CMS with each section copied `copies` - 1 times (bench/scale_cms.py),
    made once and kept beside it."""
    out = cms.parent / f"{cms.name}-x{copies}"
    done = out / "made.json"
    if done.exists():
        return out, json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "media").exists():
        (out / "media").symlink_to(cms / "media")
    live = subprocess.run([sys.executable, ROOT / "bench" / "scale_cms.py", cms / "pristine.sqlite3",
                           out / "pristine.sqlite3", "--copies", str(copies)],
                          check=True, capture_output=True, text=True).stdout
    made = dict(made, live_in_news=int(live))
    done.write_text(json.dumps(made))
    return out, made


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


def peer(py, cms, work, made):
    """wagtail-transfer's import of both locales' subtrees; its seconds per import round."""
    port = free_port()
    env = dict(cms_env(cms), CMS_TRANSFER_SOURCE=f"http://127.0.0.1:{port}")
    src = work / "transfer-source.sqlite3"
    src.write_bytes((cms / "pristine.sqlite3").read_bytes())
    env["CMS_DB"] = f"sqlite:///{src}"
    manage = CMS_PY.parent / "manage.py"
    subprocess.run([py, manage, "migrate", "-v0"], check=True, env=env, capture_output=True)
    log = open(work / "transfer-source.log", "w")
    server = subprocess.Popen([py, manage, "runserver", "--noreload", f"127.0.0.1:{port}"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        dest = dict(env, CMS_DB=f"sqlite:///{work}/transfer-dest.sqlite3", CMS_MEDIA_ROOT=f"{work}/transfer-media")
        out = subprocess.run([py, CMS_PY, "transfer-import", "--pages", f"{made['news']}:en,{made['news_de']}:de"],
                             check=True, capture_output=True, text=True, env=dest)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["pages"] == made["live_in_news"], f"wagtail-transfer imported {r['pages']} pages: {r}"
        return r["seconds"]
    finally:
        server.terminate(); server.wait()


def spread(xs, fmt="{:.2f}"):
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", type=int, default=10)
    ap.add_argument("--topics", type=int, default=10)
    ap.add_argument("--articles", type=int, default=66)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cms", type=Path, default=ROOT / "target" / "bench-cms")
    ap.add_argument("--no-peer", action="store_true", help="leave wagtail-transfer out")
    ap.add_argument("--copies", type=int, default=1,
                    help="copy each section this many times in all (bench/scale_cms.py), e.g. 10 for about 100,000 pages")
    a = ap.parse_args()
    if "BENCH_BIN" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--workspace", "--bins"], cwd=ROOT, check=True)
    py = python()
    cms = a.cms.resolve() / f"{a.sections}x{a.topics}x{a.articles}"
    made = generate(py, cms, a)
    if a.copies > 1:
        cms, made = scaled(cms, made, a.copies)
    pages = made["live_in_news"]
    rounds = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="cms-mirror-pages-") as work:
            r = one_round(py, cms, Path(work), pages)
            rounds.append(r)
            print(f"round {i + 1}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}",
                  file=sys.stderr)
    col = lambda k: [r[k] for r in rounds]
    print(f"pages in the subtree (both locales): {pages}; items of the full mirror (pages + media): {rounds[0]['items']}")
    print(f"full mirror:    {spread(col('full'))} s, {spread([pages / r['full'] for r in rounds], '{:.0f}')} pages/s")
    print(f"no change:      {spread(col('nochange'))} s, {spread([pages / r['nochange'] for r in rounds], '{:.0f}')} pages checked/s")
    print(f"1% edited:      {spread(col('edit'))} s ({rounds[0]['edited']} pages published, {rounds[0]['edit_items']} sent)")
    if not a.no_peer:
        with tempfile.TemporaryDirectory(prefix="cms-mirror-transfer-") as work:
            first, again = peer(py, cms, Path(work), made)
        print(f"wagtail-transfer: import {first:.2f} s ({pages / first:.0f} pages/s), "
              f"import again {again:.2f} s ({pages / again:.0f} pages/s)")
    print(f"peak RSS:       source {spread(col('source_mib'), '{:.0f}')} MiB, target {spread(col('target_mib'), '{:.0f}')} MiB")


if __name__ == "__main__":
    main()
