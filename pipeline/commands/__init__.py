"""Every job's command line in one package, the top layer: one module per family of jobs, each
job's entry point named ``<job>_main(argv)``; each flag's default is its settings dataclass field
(:func:`pipeline.cli.add_setting`), and ``jobs/*.py`` only call these."""
