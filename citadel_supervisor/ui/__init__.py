"""The status page: a live, read-only view of citadeld for a browser, on the exporter's listener.

- ``views``: what the page may see of a worker, an event, the GPUs and a worker's output;
- ``stream``: the live feed to the open pages (server-sent events);
- ``page``: the part itself (``ui``): its routes at ``/`` and ``/ui/``, and the files it
  serves from ``static/`` (plain HTML, CSS and JavaScript; no build step).

docs/status-page.md says what it shows, what it does not, and why it has no buttons.
"""
