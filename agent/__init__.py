"""nanorix-agent: the node daemon that builds session sandboxes, runs commands in them,
destroys them with measured evidence, and signs Cryptographic Destruction Proofs."""

__version__ = "0.1.0"
