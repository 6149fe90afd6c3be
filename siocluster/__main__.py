"""`python -m siocluster`: the operators' command, `siocluster` (see `siocluster.cli`)."""

if __name__ == "__main__":
    import sys

    from siocluster.cli import main

    sys.exit(main())
