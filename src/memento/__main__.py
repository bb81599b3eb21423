"""``python -m memento``: the same command line as the ``memento`` console script."""

from memento.cli import main

if __name__ == "__main__":
    main()
