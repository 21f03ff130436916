"""Keys (SPEC 7): `attestation` (node keys that sign CDPs, on disk, rotated) and
`session` (per-session receipt keys in locked memory, signing in C)."""
