"""MessagePack-RPC over a unix stream socket (SPEC 8): `framing` (wire shapes),
`server` (listener, peer check, per-connection concurrency), `methods` (the API table),
`client` (the CLI's client)."""
