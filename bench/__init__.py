"""Load, latency and connection-scale harness for tapprove (`python -m bench`); see RESULTS.md."""

# Every bench user's password (the baseline verifies the same one with the same argon2id).
PASSWORD = "bench password 0123456789"
