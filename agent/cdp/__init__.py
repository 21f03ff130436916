"""Cryptographic Destruction Proofs: pure functions, no I/O (SPEC 4, 6, 14).

`canonical` (C(x)), `chain` (evidence hashes, chain, final_hash), `merkle` (roots),
`receipt` (exec receipts), `receiptkeys` (receipt-key epochs of a re-adopted session),
`document` (build + sign a v1.0 CDP), `verify` (never-raising
verification), `auditproof` (the AuditProof 2.1 rendition).
"""
