"""Probes: is a worker alive, is it ready. The kinds (http, tcp, exec) and the runner that schedules them."""
