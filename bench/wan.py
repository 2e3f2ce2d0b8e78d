#!/usr/bin/env python3
"""cms-mirror against rsync -z over the WAN test bed (scripts/wan/, needs root): the
source side in the host, the target side (mirror-target, an rsync daemon) in a network
namespace behind a veth pair shaped with tc's token bucket filter, and for latency a
delaying proxy in front of each service. Per link profile:

  full    the mixed dataset mirrored into an empty destination
  edit    the mixed dataset's 1 % edit (../shared/bench gen_dataset.py mutate) applied
  insert  a 100-byte insert into the middle of each 64 MiB file of the large dataset
          (its first mirror made with the link unshaped, untimed)

Wall time, and the bytes that crossed the link each way (the host end's interface
counters: payload, headers and retransmissions alike, for both tools). cms-mirror runs
with `compression = "zstd"` (its setting for slow links), rsync with -z; both verified
afterwards with rsync -anc. BENCH_CHANNEL_TOML adds keys to each channel,
BENCH_TARGET_ARGS arguments to mirror-target (e.g. `--durability none`, which does
not sync, as rsync does not).

Before each timed run the destination's files are dropped from the page cache
(`--basis cold`, the default: the old versions a delta copies from are read from the
disk, as on a mirror whose last run was a while ago) or read into it (`--basis warm`),
for every tool alike: otherwise the condition would be whatever the tool's own untimed
first mirror left behind (rsync leaves its writes cached, cms-mirror drops them).
`--tools` picks the tools: cms-mirror, "rsync -z", and "rsync -z --fsync" (which syncs
each file it writes, as cms-mirror's durable acks do).

  bench/wan.py [--profiles 100mbit,20mbit+80ms] [--cases full,edit,insert] [--rounds 1]
               [--basis cold|warm] [--tools "cms-mirror,rsync -z"]
"""
import argparse, json, os, re, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402  (the loopback benchmark's helpers)

ROOT = base.ROOT
BED = ROOT / "scripts" / "wan" / "bed.py"
PROXY = ROOT / "scripts" / "wan" / "delay_proxy.py"
N = 201
NS, HOST, INNER_IP = f"cmw{N}", f"cmw{N}a", f"10.77.{N}.2"


def bed(*args):
    base.sh(sys.executable, BED, *args)


def counters():
    d = Path(f"/sys/class/net/{HOST}/statistics")
    return int((d / "tx_bytes").read_text()), int((d / "rx_bytes").read_text())


def in_ns(cmd):
    return ["ip", "netns", "exec", NS] + [str(c) for c in cmd]


class Link:
    """The bed with a profile: rate, and a one-way delay through proxies."""

    def __init__(self, profile):
        rate, _, delay = profile.partition("+")
        self.rate, self.delay_ms = rate, int(delay.removesuffix("ms") or 0)
        self.procs = []

    def front(self, port):
        """The address the host side uses for a service on 127.0.0.1:port in the
        namespace: through a delaying proxy, or the namespace's own address."""
        if not self.delay_ms:
            return None
        front = f"{INNER_IP}:{port + 1}"
        p, _ = base.start(in_ns([sys.executable, PROXY, "--listen", front, "--to", f"127.0.0.1:{port}",
                                 "--delay-ms", self.delay_ms]), "/dev/null")
        self.procs.append(p)
        return front

    def stop(self):
        for p in self.procs:
            p.terminate(); p.wait()
        self.procs = []


def timed(fn):
    tx0, rx0 = counters()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    tx1, rx1 = counters()
    return {"wall": wall, "out": tx1 - tx0, "back": rx1 - rx0}


class Cms:
    def __init__(self, work, link, trees):
        self.work, self.link = work, link
        self.dst = work / f"cms-dst-{time.time_ns()}"
        tdir, sdir = work / f"cms-t-{time.time_ns()}", work / f"cms-s-{time.time_ns()}"
        tdir.mkdir(); sdir.mkdir()
        port = 7400 + N
        listen = f"127.0.0.1:{port}" if link.delay_ms else f"{INNER_IP}:{port}"
        self.target, _ = base.start(in_ns([base.BIN / "mirror-target", "--listen", listen, "--site",
                                           f"main={self.dst}", "--data-dir", tdir,
                                           *os.environ.get("BENCH_TARGET_ARGS", "").split()]), tdir / "log")
        url = f"http://{link.front(port) or listen}"
        cfg = sdir / "mirror.toml"
        cfg.write_text("".join(
            f'[[channel]]\nname = "{name}"\nsource = "{tree}"\ndelete = true\ncompression = "zstd"\n'
            f'retry_budget = 30\nmax_delete = "100%"\n{os.environ.get("BENCH_CHANNEL_TOML", "")}'
            f'[[channel.target]]\nurl = "{url}"\nsite = "main"\n'
            for name, tree in trees.items()))
        self.source, addr = base.start([base.BIN / "mirror-source", "--listen", "127.0.0.1:0", "--config", cfg,
                                        "--data-dir", sdir, "--check-interval-secs", "0"], sdir / "log")
        self.url = f"http://{addr}"

    def run(self, channel):
        out = subprocess.run([base.BIN / "mirrorctl", "--source", self.url, "start", channel, "--wait", "--json"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"cms-mirror {channel} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def stop(self):
        for p in (self.source, self.target):
            p.terminate(); p.wait()


class Rsync:
    def __init__(self, work, link, opts=()):
        self.opts = list(opts)
        self.root = work / f"rsyncd-{time.time_ns()}"
        self.root.mkdir()
        port = 7600 + N
        conf = self.root / "rsyncd.conf"
        conf.write_text(f"use chroot = false\nuid = root\ngid = root\n[bench]\npath = {self.root}\nread only = false\n")
        addr = "127.0.0.1" if link.delay_ms else INNER_IP
        self.daemon = subprocess.Popen(in_ns(["rsync", "--daemon", "--no-detach", f"--address={addr}",
                                              f"--port={port}", f"--config={conf}"]))
        time.sleep(0.5)
        self.url = f"rsync://{link.front(port) or f'{addr}:{port}'}/bench/dst/"
        self.dst = self.root / "dst"

    def run(self, tree):
        subprocess.run(["rsync", "-az", "--delete", *self.opts, f"{tree}/", self.url], check=True)

    def stop(self):
        self.daemon.terminate(); self.daemon.wait()


def insert_large(tree):
    base.sh(sys.executable, base.GEN, "mutate", tree, "--seed", "3", "--modify-frac", "0", "--add-frac", "0",
            "--delete-frac", "0", "--large-insert-all")


def settle(dst, basis):
    """Drops the files under `dst` from the page cache (cold) or reads them in (warm).
    Called after `base.warm`'s sync: a dirty page is not dropped."""
    for dirpath, _, names in os.walk(dst):
        for n in names:
            path = os.path.join(dirpath, n)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if basis == "cold":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                else:
                    while os.read(fd, 1 << 20):
                        pass
            finally:
                os.close(fd)


def one(tool, work, link, case, data, basis):
    mixed, mixed_mut = data / "base" / "mixed", data / "mut" / "mixed"
    large = work / f"large-{time.time_ns()}"
    if case == "insert":
        base.sh("cp", "-a", data / "base" / "large", large)
    trees = {"mixed": mixed, "mixed_mut": mixed_mut, "large": large}
    t = Cms(work, link, trees) if tool == "cms-mirror" else Rsync(work, link, tool.split()[2:])
    go = (lambda name: t.run(name)) if tool == "cms-mirror" else (lambda name: t.run(trees[name]))
    try:
        if case == "full":
            base.warm(mixed)
            r = timed(lambda: go("mixed"))
            base.verify(mixed, t.dst)
        elif case == "edit":
            bed("shape", str(N), "--rate", "none")
            go("mixed")
            bed("shape", str(N), "--rate", link.rate)
            base.warm(mixed_mut)
            settle(t.dst, basis)
            r = timed(lambda: go("mixed_mut"))
            base.verify(mixed_mut, t.dst)
        else:
            bed("shape", str(N), "--rate", "none")
            go("large")
            bed("shape", str(N), "--rate", link.rate)
            insert_large(large)
            base.warm(large)
            settle(t.dst, basis)
            r = timed(lambda: go("large"))
            base.verify(large, t.dst)
    finally:
        t.stop()
        if case == "insert":
            base.sh("rm", "-rf", large)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="100mbit,20mbit+80ms")
    ap.add_argument("--cases", default="full,edit,insert")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--basis", choices=["cold", "warm"], default="cold")
    ap.add_argument("--tools", default="cms-mirror,rsync -z")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/tmp/cms-mirror-bench"))
    a = ap.parse_args()
    tools = a.tools.split(",")
    unknown = set(tools) - {"cms-mirror", "rsync -z", "rsync -z --fsync"}
    if unknown:
        raise SystemExit(f"unknown tools {sorted(unknown)}")
    if os.geteuid() != 0:
        raise SystemExit("the WAN bench needs root (network namespaces, tc)")
    data = Path(a.dir)
    base.datasets(data, ["mixed", "large"])
    work = data / "wan-work"
    base.sh("rm", "-rf", work)
    work.mkdir(parents=True)
    print(f"basis {a.basis}, mirror-target {os.environ.get('BENCH_TARGET_ARGS', '')}")
    print("| link | case | tool | wall s | out MB | back MB | total MB |")
    print("|---|---|---|---:|---:|---:|---:|")
    try:
        for profile in a.profiles.split(","):
            link = Link(profile)
            bed("up", str(N), "--rate", link.rate)
            try:
                for case in a.cases.split(","):
                    for rnd in range(a.rounds):
                        for tool in tools if rnd % 2 == 0 else tools[::-1]:
                            r = one(tool, work, link, case, data, a.basis)
                            link.stop()
                            print(f"| {profile} | {case} | {tool} | {r['wall']:.2f} | {r['out'] / 1e6:.3f} | "
                                  f"{r['back'] / 1e6:.3f} | {(r['out'] + r['back']) / 1e6:.3f} |", flush=True)
            finally:
                link.stop()
                bed("down", str(N))
    finally:
        base.sh("rm", "-rf", work)


if __name__ == "__main__":
    main()
