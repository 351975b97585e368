"""Scaling-sweep configs: an ordinary training config plus a `sweep` section (train/scaling/plan.py).

Run one with `python -m launch.sweep --config=configs/sweeps/cpu.py --workdir=runs/sweep_cpu`
(or `python -m launch.main` with the same flags)."""
