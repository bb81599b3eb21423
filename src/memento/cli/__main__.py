"""``python -m memento.cli``: the same command line as ``memento`` and ``python -m memento``."""

from memento.cli import main

if __name__ == "__main__":
    main()
