#!/usr/bin/env python3
"""A WAN test bed on one machine (needs root): the host and a network namespace joined
by a veth pair, each end's egress rate-limited with tc's token bucket filter (this
kernel has no netem; latency comes from delay_proxy.py).

  bed.py up N --rate 20mbit     namespace cmwN, host end cmwNa 10.77.N.1, namespace end
                                cmwNb 10.77.N.2 (N in 1..250)
  bed.py shape N --rate R       another rate (none: unlimited)
  bed.py cut N / restore N      the link down (packets dropped, routes gone) / up again
  bed.py down N                 everything removed
"""
import argparse
import subprocess
import sys


def sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def names(n):
    return f"cmw{n}", f"cmw{n}a", f"cmw{n}b", f"10.77.{n}.1", f"10.77.{n}.2"


def rate_bits(rate):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.lower().endswith(u):
            return float(rate[: -len(u)]) * f
    sys.exit(f"rate {rate!r}: use kbit, mbit or gbit")


def shape(prefix, dev, rate):
    # The bucket holds ~20 ms at the rate (at least 64 KiB: a TSO burst must fit), the
    # queue ~100 ms: a sender that floods the link queues, as on a real access link.
    burst = max(int(rate_bits(rate) / 8 * 0.02), 64 * 1024)
    sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
       "burst", str(burst), "latency", "100ms")


def up(n, rate):
    ns, host, inner, a, b = names(n)
    down(n)
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
    sh("ip", "link", "set", inner, "netns", ns)
    sh("ip", "addr", "add", f"{a}/24", "dev", host)
    sh("ip", "link", "set", host, "up")
    sh("ip", "-n", ns, "addr", "add", f"{b}/24", "dev", inner)
    sh("ip", "-n", ns, "link", "set", inner, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    if rate:
        shape([], host, rate)
        shape(["ip", "netns", "exec", ns], inner, rate)


def reshape(n, rate):
    ns, host, inner, *_ = names(n)
    if rate and rate != "none":
        shape([], host, rate)
        shape(["ip", "netns", "exec", ns], inner, rate)
    else:
        sh("tc", "qdisc", "del", "dev", host, "root", check=False)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", inner, "root", check=False)


def down(n):
    ns, host, *_ = names(n)
    sh("ip", "link", "del", host, check=False)
    sh("ip", "netns", "del", ns, check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["up", "down", "shape", "cut", "restore"])
    ap.add_argument("n", type=int)
    ap.add_argument("--rate", help="e.g. 20mbit (none: unlimited)")
    a = ap.parse_args()
    if not 1 <= a.n <= 250:
        sys.exit("N must be 1..250")
    host = names(a.n)[1]
    if a.cmd == "up":
        up(a.n, a.rate)
    elif a.cmd == "down":
        down(a.n)
    elif a.cmd == "shape":
        reshape(a.n, a.rate)
    elif a.cmd == "cut":
        sh("ip", "link", "set", host, "down")
    else:
        sh("ip", "link", "set", host, "up")


if __name__ == "__main__":
    main()
