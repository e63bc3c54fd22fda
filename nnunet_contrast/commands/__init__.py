"""What users run: the ``nnunet-contrast`` command line, the demo, the plans writer, the benchmark
and its report, and the embedding picture."""
