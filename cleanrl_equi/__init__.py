"""cleanrl-equi: small shared building blocks for the single-file scripts at the repository root.

Importing the package silences escnn's warning about the optional `py3nj` package (used by escnn only for
3-D groups; every group here is 2-D) and registers the manipulation tasks with gymnasium.
"""

import warnings

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)
