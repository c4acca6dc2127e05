"""Processes: spawning a worker, its process tree, reaping, cgroups, the state file.

Everything here touches the operating system's processes and nothing of
Citadel's config beyond plain values: ``spawn`` starts a process group (or a
cgroup), ``tree`` tracks and signals what belongs to a worker, ``reaper``
collects exit statuses, ``procstat`` reads ``/proc``, ``statefile`` remembers
the workers across a restart of citadeld, ``accounts`` resolves the user a
worker runs as, ``listeners`` finds which process owns a listening port.
"""
