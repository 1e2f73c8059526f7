"""Training: one loop (loop.py), two launchers (launch.py), checkpoints (checkpoint.py)."""
