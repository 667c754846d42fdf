"""Rollout: generation workers that sample completions from the current policy.

`RolloutGroup` (driver side) holds `RolloutWorker` actors; each keeps an unsharded copy
of the policy, updated by weight sync after every optimizer step and versioned, so that a
generation never mixes two policy versions.
"""
