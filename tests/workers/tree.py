"""A test worker that builds a process tree meant to escape a naive supervisor.

Usage: tree.py PIDFILE [--exit-after SECONDS]
- a child that ignores SIGTERM (stays in the worker's process group);
- a grandchild that calls setsid() and is orphaned (its parent exits), so
  it leaves the process group and is reparented;
Writes the pids of the leader and every descendant to PIDFILE, one per line.
"""

import os
import signal
import sys
import time

pidfile = sys.argv[1]
exit_after = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--exit-after" else None
read_end, write_end = os.pipe()

stubborn = os.fork()
if stubborn == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(write_end, f"stubborn {os.getpid()}\n".encode())
    while True:
        time.sleep(1)

middle = os.fork()
if middle == 0:
    escaped = os.fork()
    if escaped == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(write_end, f"escaped {os.getpid()}\n".encode())
        while True:
            time.sleep(1)
    os._exit(0)  # orphan the escaped grandchild
os.waitpid(middle, 0)

pids = [os.getpid()]
buf = b""
while buf.count(b"\n") < 2:
    buf += os.read(read_end, 100)
found = dict(line.split() for line in buf.decode().splitlines())
pids += [int(found["stubborn"]), int(found["escaped"])]
with open(pidfile + ".tmp", "w") as fh:
    fh.write("\n".join(str(p) for p in pids) + "\n")
os.rename(pidfile + ".tmp", pidfile)
print("tree ready", flush=True)
if exit_after is not None:
    time.sleep(exit_after)
    sys.exit(7)
while True:
    time.sleep(1)
