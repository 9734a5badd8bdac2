"""The core: what a key, an account and an answer are, and the pure decisions on them
(health, strategies, policy, quota, merge, ...). It imports nothing else of rotator."""
