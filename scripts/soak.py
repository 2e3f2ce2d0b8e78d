#!/usr/bin/env python3
"""Crash soak (see scripts/soak.sh): rounds of source edits, each mirrored by a job
during which the source, the target or both are killed with SIGKILL at random moments
and started again. After every round the target must equal the source (rsync -anc
--delete lists nothing) and both SQLite databases must pass `PRAGMA integrity_check`.
Prints one line per round and a summary: rounds, kills, divergences, failed jobs and the
worst time from a restart to the job's end. Standard library only.
"""
import argparse, json, os, random, shutil, signal, sqlite3, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("SOAK_BIN", ROOT / "target" / "release"))


def start(cmd, log):
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=open(log, "a"), text=True)
    for line in p.stdout:
        if "listening on" in line:
            return p, line.split("listening on")[1].strip()
    raise SystemExit(f"{cmd[0]} did not start; see {log}")


def kill(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


def mirrorctl(url, *args):
    out = subprocess.run([BIN / "mirrorctl", "--source", url, *args], capture_output=True, text=True)
    return out.returncode, out.stdout


def job_state(url, job):
    code, out = mirrorctl(url, "show", job, "--json")
    try:
        return json.loads(out)["state"] if code == 0 else None
    except ValueError:
        return None


def fill(src, rng, n):
    for i in range(n):
        d = src / f"d{i % 20}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.html").write_bytes(rng.randbytes(200 + rng.randrange(20000)))
    (src / "media").mkdir(exist_ok=True)
    for i in range(4):
        (src / "media" / f"big{i}.bin").write_bytes(rng.randbytes(8 << 20))


def edit(src, rng):
    """Edits, adds and deletes a few percent of the files."""
    files = [p for p in src.rglob("*") if p.is_file()]
    for p in rng.sample(files, max(1, len(files) // 30)):
        choice = rng.random()
        if choice < 0.5:
            p.write_bytes(rng.randbytes(200 + rng.randrange(20000)))
        elif choice < 0.7:
            p.unlink()
        else:
            (p.parent / f"new{rng.randrange(1 << 30)}.html").write_bytes(rng.randbytes(3000))
    big = src / "media" / f"big{rng.randrange(4)}.bin"
    big.write_bytes(rng.randbytes(8 << 20))


def diverges(src, dst):
    # The target's trace file is its own note, not content.
    out = subprocess.run(["rsync", "-anci", "--delete", "--exclude=/.cms-mirror-trace", f"{src}/", f"{dst}/"],
                         capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if l.strip()]


def intact(db):
    if not db.exists():
        return True
    with sqlite3.connect(db) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class Services:
    def __init__(self, work, src, dst):
        self.work, self.src, self.dst = work, src, dst
        self.target = self.source = None
        self.taddr = None
        self.start_target()
        cfg = work / "mirror.toml"
        cfg.write_text(
            f'[[channel]]\nname = "site"\nsource = "{src}"\ndelete = true\npackage_bytes = 65536\nwindow = 4\n'
            f'retry_budget = 1000\nack_timeout_secs = 10\n[[channel.target]]\nurl = "http://{self.taddr}"\nsite = "main"\n')
        self.cfg = cfg
        self.start_source()

    def start_target(self):
        listen = self.taddr or "127.0.0.1:0"
        self.target, self.taddr = start([BIN / "mirror-target", "--listen", listen, "--site", f"main={self.dst}",
                                         "--data-dir", self.work / "t"], self.work / "target.log")

    def start_source(self):
        self.source, saddr = start([BIN / "mirror-source", "--listen", "127.0.0.1:0", "--config", self.cfg,
                                    "--data-dir", self.work / "s", "--lease-secs", "3"], self.work / "source.log")
        self.url = f"http://{saddr}"

    def stop(self):
        kill(self.source)
        kill(self.target)


def run_round(svc, rng, stats):
    """One job with random kills; returns (state, seconds from the last restart to its end)."""
    code, out = mirrorctl(svc.url, "start", "site")
    if code != 0:
        raise SystemExit(f"cannot start a job: {out}")
    job = out.strip()
    restarted = time.monotonic()
    # One or two kills, early: a round's job takes about a second.
    for _ in range(1 + rng.randrange(2)):
        time.sleep(rng.uniform(0.02, 0.5))
        if job_state(svc.url, job) not in ("queued", "running"):
            break
        who = rng.choice(["source", "target", "both"])
        if who in ("target", "both"):
            kill(svc.target)
            stats["kills"] += 1
        if who in ("source", "both"):
            kill(svc.source)
            stats["kills"] += 1
        time.sleep(rng.uniform(0, 0.5))
        if who in ("target", "both"):
            svc.start_target()
        if who in ("source", "both"):
            svc.start_source()
        restarted = time.monotonic()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = job_state(svc.url, job)
        if state not in (None, "queued", "running"):
            return state, time.monotonic() - restarted
        time.sleep(0.1)
    return "timed out", time.monotonic() - restarted


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10, help="stop starting rounds after this long")
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="cms-mirror-soak-"))
    src, dst = work / "src", work / "dst"
    fill(src, rng, a.files)
    svc = Services(work, src, dst)
    stats = {"rounds": 0, "kills": 0, "divergences": 0, "failed": 0, "worst": 0.0}
    end = time.monotonic() + a.minutes * 60
    try:
        while time.monotonic() < end:
            stats["rounds"] += 1
            edit(src, rng)
            kills_before = stats["kills"]
            state, recovery = run_round(svc, rng, stats)
            if state != "succeeded":
                stats["failed"] += 1
                # A job that failed is followed by one without kills: it must end exact.
                state, _ = run_round(svc, random.Random(0), {"kills": 0})
            diff = diverges(src, dst)
            ok_db = intact(work / "s" / "source.db") and intact(work / "t" / "target.db")
            if diff or not ok_db:
                stats["divergences"] += 1
            if stats["kills"] > kills_before:
                stats["worst"] = max(stats["worst"], recovery)
            kills = stats["kills"] - kills_before
            recovered = f", recovered in {recovery:.1f} s" if kills else ""
            print(f"round {stats['rounds']}: {state}, kills {kills}{recovered}, "
                  f"differences {len(diff)}{' ' + str(diff[:3]) if diff else ''}, "
                  f"databases {'intact' if ok_db else 'DAMAGED'}", flush=True)
    finally:
        svc.stop()
    print(f"rounds {stats['rounds']}, kills {stats['kills']}, divergences {stats['divergences']}, "
          f"failed jobs {stats['failed']}, worst time to recover {stats['worst']:.1f} s")
    if stats["divergences"] == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} for inspection")
    sys.exit(1 if stats["divergences"] else 0)


if __name__ == "__main__":
    main()
