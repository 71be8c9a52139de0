"""One module per ``vballoon`` subcommand: ``add_arguments(parser)`` and ``main(args)``."""
