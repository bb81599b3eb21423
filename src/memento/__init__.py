"""memento: teach language models to manage their own context (the MEMENTO method).

The foundation is :mod:`memento.format` (the trace format and its grammar) and
:mod:`memento.masking` (the one rule for who sees what, shared by training, inference and
analysis).
"""

__version__ = "0.1.0"
