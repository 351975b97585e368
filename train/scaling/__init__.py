"""Chinchilla-style scaling laws: counting, IsoFLOP planning, fitting, plots and reports.

- counting.py   parameter counts (total / non-embedding / active) and FLOPs per token
                (PaLM App. B; DeepSeek LLM's M; Kaplan's 12·L·d²).
- plan.py       budgets × shape ladder → IsoFLOP points (`plan_sweep`, `point_config`).
- fit.py        Hoffmann et al. 2022 approaches 1 and 2 and power laws, bootstrap intervals.
- parametric.py approach 3: L(N, D) = E + A/N^α + B/D^β by summed Huber on log loss (Epoch recipe).
- plots.py      PNG plots (matplotlib, imported lazily by report.py).
- report.py     results.csv/json, fits.json and report.md.
The runner is launch/sweep.py; configs are in configs/sweeps/.
"""
