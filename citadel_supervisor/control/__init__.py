"""The control API: HTTP with JSON over citadeld's Unix socket (server), and its client."""

#: The prefix of every path of this version of the API.
API_PREFIX = "/v1"
