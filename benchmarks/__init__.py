"""Side-by-side benchmarks: ours against TRL and plain PyTorch on identical work.

Run `python -m benchmarks` (see benchmarks/README.md); results land in benchmarks/results/.
"""
