"""Command-line interface: difftrain train | sample | eval | components | report."""
