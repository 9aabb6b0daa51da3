"""Benchmarks: our AdamW side by side with the AdamWs a user would pick instead, against the
memory-bandwidth roof of this machine. Run ``python -m benchmarks --help``; see the README."""
