"""Command-line verbs of ``visor`` (one module per verb, see ``visor.cli.main``)."""
