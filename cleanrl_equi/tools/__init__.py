"""Command-line tools that are not training scripts: `plot_runs` (learning curves and tables from runs/) and
`make_dataset` (offline datasets of the manipulation tasks)."""
